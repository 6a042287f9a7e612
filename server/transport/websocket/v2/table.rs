//! The call machine's state: a socket's live calls by id, each with what
//! the protocol's rules need (request credit, `closeSend`) and the plug-in
//! that answers it, and the wakers through which a call's backend tells the
//! socket it has news.
//!
//! The rules (credit both ways, deadlines, cancel, drain, the one `status`
//! each call ends with) are the socket's ([`super::socket`]), the same for
//! every call. Below them a call is answered by one of two plug-ins:
//!
//! - [`GrpcCall`]: a gRPC request on the backend, for any method of any
//!   service (added in process, or the upstream's);
//! - [`BuiltinCall`]: the built-in `DataService`'s processor called on the
//!   socket's task, for `/DataService/BidirectionalStream` when this process
//!   runs it: the same replies without tonic's codec, measured at a quarter
//!   of the generic path's CPU per message (docs/benchmarks.md).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake};

use futures_util::task::AtomicWaker;
use tokio::time::Instant;
use tonic::Status;

use super::budget::Budget;
use super::builtin::BuiltinCall;
use super::grpc_call::GrpcCall;

/// Request credit a call starts with (the protocol's).
pub const REQUEST_WINDOW: u64 = streambridge_protocol::v2::DEFAULT_WINDOW as u64;

/// The request credit the server keeps a call topped up to: whenever the
/// credit left falls to half of this, a grant brings it back. With only the
/// first 256 in flight, a browser and the server take turns (each idle while
/// the other works through its batch); 1024 keeps both busy. Memory is
/// bounded by the socket's byte budget (`--ws-socket-buffer`), not by this.
pub const REQUEST_CREDIT: u16 = 1024;

/// A call the socket knows: what the client may send, and who answers.
/// Small on purpose (see [`BuiltinCall`]): the socket looks it up for every
/// record.
pub struct LiveCall {
    /// Request messages the client may still send: 256 at `open`, plus
    /// every grant written to it, less every message it sent.
    pub request_credit: u32,
    pub closed_send: bool,
    pub route: Route,
}

/// Who answers a call.
pub enum Route {
    /// A gRPC request on the backend. Boxed: the built-in route is the one
    /// that must stay small.
    Grpc(Box<GrpcCall>),
    /// The processor, on the socket's task.
    Builtin(BuiltinCall),
}

/// The live calls of a socket by id, in the order they were opened. A
/// client's ids increase (`open` refuses one that does not), so a new call
/// goes at the end and a look-up (one per record) is a binary search over
/// at most `--ws-max-calls` entries. A vector rather than a hash map: a
/// socket with one call (every v1 socket) holds that entry's bytes, not a
/// table's.
#[derive(Default)]
pub struct CallTable(Vec<(u32, LiveCall)>);

impl CallTable {
    fn position(&self, call: u32) -> Result<usize, usize> {
        self.0.binary_search_by_key(&call, |(id, _)| *id)
    }

    pub fn get(&self, call: &u32) -> Option<&LiveCall> {
        let index = self.position(*call).ok()?;
        Some(&self.0[index].1)
    }

    pub fn get_mut(&mut self, call: &u32) -> Option<&mut LiveCall> {
        let index = self.position(*call).ok()?;
        Some(&mut self.0[index].1)
    }

    /// Adds `call`, whose id is larger than every id in the table.
    pub fn insert(&mut self, call: u32, live: LiveCall) {
        debug_assert!(self.0.last().is_none_or(|(last, _)| *last < call), "call ids increase");
        if self.0.capacity() == 0 {
            // One entry, not the four a first push makes room for.
            self.0.reserve_exact(1);
        }
        self.0.push((call, live));
    }

    pub fn remove(&mut self, call: &u32) -> Option<LiveCall> {
        let index = self.position(*call).ok()?;
        Some(self.0.remove(index).1)
    }

    pub fn keys(&self) -> impl Iterator<Item = &u32> {
        self.0.iter().map(|(call, _)| call)
    }

    pub fn values(&self) -> impl Iterator<Item = &LiveCall> {
        self.0.iter().map(|(_, live)| live)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &LiveCall)> {
        self.0.iter().map(|(call, live)| (call, live))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl LiveCall {
    pub fn new(route: Route) -> LiveCall {
        LiveCall {
            request_credit: streambridge_protocol::v2::DEFAULT_WINDOW,
            closed_send: false,
            route,
        }
    }

    /// Whether the socket may read past a full budget for this call: it
    /// holds no budget, or it waits for response credit (which only a
    /// record the socket has not read yet can give).
    pub fn lets_socket_read(&self) -> bool {
        match &self.route {
            Route::Grpc(grpc) => grpc.lets_socket_read(),
            Route::Builtin(builtin) => builtin.lets_socket_read(),
        }
    }

    /// When the call's `timeoutMs` passes, and the `timeoutMs`.
    pub fn deadline(&self) -> Option<(Instant, u32)> {
        match &self.route {
            Route::Grpc(grpc) => grpc.deadline(),
            Route::Builtin(builtin) => builtin.deadline(),
        }
    }

    /// Ends the call's plug-in: what waits gives its bytes back, the
    /// backend's stream (if any) is ended.
    pub fn finish(self, status: &Status, budget: &Budget) {
        match self.route {
            Route::Grpc(grpc) => drop(grpc),
            Route::Builtin(builtin) => builtin.finish(status, budget),
        }
    }
}

/// The calls of one socket that have news, and the socket's waker.
#[derive(Default)]
pub struct Wakeups {
    woken: Mutex<Vec<u32>>,
    socket: AtomicWaker,
}

impl Wakeups {
    /// Moves the calls woken since the last time into `ready`; pending (the
    /// socket's waker registered) while there are none.
    pub fn poll_woken(&self, cx: &mut Context<'_>, ready: &mut VecDeque<u32>) -> Poll<()> {
        self.socket.register(cx.waker());
        let mut woken = self.woken.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if woken.is_empty() {
            return Poll::Pending;
        }
        ready.extend(woken.drain(..));
        Poll::Ready(())
    }
}

/// The waker of one call: waking it queues the call's id for its socket
/// (once until the socket polls it) and wakes the socket.
pub struct CallWaker {
    call: u32,
    wakeups: Arc<Wakeups>,
    queued: AtomicBool,
}

impl CallWaker {
    pub fn new(call: u32, wakeups: &Arc<Wakeups>) -> Arc<CallWaker> {
        Arc::new(CallWaker {
            call,
            wakeups: wakeups.clone(),
            queued: AtomicBool::new(false),
        })
    }

    /// The socket is about to poll the call: a wake from now on queues it again.
    pub fn polling(&self) {
        self.queued.store(false, Ordering::Release);
    }
}

impl Wake for CallWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.wakeups
                .woken
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(self.call);
            self.wakeups.socket.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket looks a call up for every record, usually with the table
    /// cold in the cache, so each cache line an entry spans can be a miss per
    /// message (docs/benchmarks.md, "Cache lines and syscalls at the same
    /// rate": entries of 120 bytes were the socket's largest cost). Grow an
    /// entry on purpose, not by accident.
    #[test]
    fn a_call_table_entry_stays_small() {
        assert!(std::mem::size_of::<(u32, LiveCall)>() <= 40);
    }
}
