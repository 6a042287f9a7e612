//! Rate limits: a token bucket per caller, `governor`'s (GCRA, lock-free per
//! key), for new calls (`--limit-calls-per-second`, `--limit-calls-burst`)
//! and for request messages (`--limit-messages-per-second`,
//! `--limit-messages-burst`). A caller is its JWT's `sub`, or "whoever has
//! the shared token", or, without either, its client address: the TCP
//! peer's, or, when the peer is a proxy listed in `--trusted-proxy`, the
//! address that proxy says it forwards for (`X-Forwarded-For`, else
//! `Forwarded: for=`), read from the right past every trusted hop.
//!
//! A new call over the limit is refused at once with RESOURCE_EXHAUSTED. A
//! request message over the limit is never dropped and never fails its
//! call: the bridge stops taking that call's requests until the bucket has
//! refilled ([`MessageMeter`]), and the transport's own backpressure (v2
//! request credit, HTTP/2 flow control, v1's bounded read-ahead) holds the
//! sender back. A client can therefore never get far past its limit, and
//! what the bridge holds while it waits is what those windows already allow.
//!
//! Buckets of callers that have been quiet longer than their bucket takes
//! to refill are forgotten every minute, so their number stays bounded by
//! the callers of the last minute.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use ipnet::IpNet;
use tokio::time::Instant;

use super::auth::Caller;

/// Whose bucket a call is taken from.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Bucket {
    Subject(Arc<str>),
    SharedToken,
    Address(IpAddr),
}

/// One kind of limit: the buckets and the rate (for messages).
#[derive(Clone, Debug)]
struct Limiter {
    buckets: Arc<DefaultKeyedRateLimiter<Bucket>>,
    per_second: u32,
    burst: u32,
}

impl Limiter {
    fn new(per_second: Option<NonZeroU32>, burst: Option<NonZeroU32>) -> Option<Limiter> {
        let rate = per_second?;
        let burst = burst.unwrap_or(rate);
        Some(Limiter {
            buckets: Arc::new(RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))),
            per_second: rate.get(),
            burst: burst.get(),
        })
    }
}

/// The rate limits in force; nothing when no limit is set.
#[derive(Clone, Debug, Default)]
pub struct RateLimits {
    calls: Option<Limiter>,
    messages: Option<Limiter>,
    trusted_proxies: Arc<[IpNet]>,
}

/// Limits as the command line sets them: `(per second, burst)` for calls
/// and for messages, and the proxies whose forwarded addresses are believed.
#[derive(Clone, Debug, Default)]
pub struct LimitSettings {
    pub calls: (Option<NonZeroU32>, Option<NonZeroU32>),
    pub messages: (Option<NonZeroU32>, Option<NonZeroU32>),
    pub trusted_proxies: Vec<IpNet>,
}

impl RateLimits {
    pub fn new(settings: LimitSettings) -> RateLimits {
        RateLimits {
            calls: Limiter::new(settings.calls.0, settings.calls.1),
            messages: Limiter::new(settings.messages.0, settings.messages.1),
            trusted_proxies: settings.trusted_proxies.into(),
        }
    }

    /// The client's address as the limits see it: the peer's, or what a
    /// trusted proxy forwards for.
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?;
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        // From the right: what the trusted proxy nearest to us added first.
        // An entry that does not parse ends the walk at the last address
        // known good (a client could have written it, and what lies beyond).
        let mut client = peer;
        for entry in forwarded_for(headers).into_iter().rev() {
            let Some(address) = entry else { break };
            client = address;
            if !self.is_trusted(address) {
                break;
            }
        }
        Some(client)
    }

    fn is_trusted(&self, address: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&address))
    }

    /// Takes one new call from the caller's bucket, or RESOURCE_EXHAUSTED.
    pub fn take_call(&self, caller: &Caller, client: Option<IpAddr>) -> Result<(), tonic::Status> {
        let Some(limiter) = &self.calls else { return Ok(()) };
        let Some((bucket, who)) = bucket_of(caller, client) else {
            return Ok(());
        };
        limiter.buckets.check_key(&bucket).map_err(|_| {
            tonic::Status::resource_exhausted(format!(
                "call rate limit reached for {who}: {} new calls a second (--limit-calls-per-second); retry later",
                limiter.per_second
            ))
        })
    }

    /// What paces one call's request messages, when messages are limited.
    pub fn message_meter(&self, caller: &Caller, client: Option<IpAddr>) -> Option<MessageMeter> {
        let limiter = self.messages.clone()?;
        let (bucket, _) = bucket_of(caller, client)?;
        // Taking a few tokens at a time keeps the shared bucket off the
        // path of most messages; what one call holds unspent is at most a
        // sixteenth of the burst, and never more than the bucket gave.
        let lease = (limiter.burst / 16).clamp(1, 32);
        Some(MessageMeter {
            limiter,
            bucket,
            prepaid: 0,
            lease,
        })
    }

    /// Forgets the buckets of callers quiet for longer than a refill, every
    /// minute until `shutdown`.
    pub async fn forget_idle(self, shutdown: tokio_util::sync::CancellationToken) {
        let limiters: Vec<Limiter> = self.calls.into_iter().chain(self.messages).collect();
        if limiters.is_empty() {
            return;
        }
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {
                    for limiter in &limiters {
                        limiter.buckets.retain_recent();
                        limiter.buckets.shrink_to_fit();
                    }
                }
            }
        }
    }
}

/// The bucket a caller's calls and messages are taken from, and how a
/// refusal names it; none for an anonymous caller of unknown address.
fn bucket_of(caller: &Caller, client: Option<IpAddr>) -> Option<(Bucket, &'static str)> {
    let by_address = || client.map(|address| (Bucket::Address(network_of(address)), "this client address"));
    match caller {
        Caller::Identity(identity) => match identity.claim_text("sub") {
            Some(sub) => Some((Bucket::Subject(sub.into()), "this caller (its token's sub)")),
            // Without a `sub` a token names nobody to count.
            None => by_address(),
        },
        Caller::Token => Some((Bucket::SharedToken, "the shared token's holders")),
        Caller::Anonymous => by_address(),
    }
}

/// Pays for one call's request messages from its caller's message bucket.
#[derive(Debug)]
pub struct MessageMeter {
    limiter: Limiter,
    bucket: Bucket,
    /// Tokens taken from the bucket and not spent yet.
    prepaid: u32,
    /// How many tokens to take ahead when the bucket has them.
    lease: u32,
}

/// How much of a payment went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paid {
    /// Every message asked for.
    All,
    /// Only this many (fewer than asked); try again for the rest at `retry`.
    Part { paid: usize, retry: Instant },
}

impl MessageMeter {
    /// Takes the tokens paid ahead, for a caller that spends them itself
    /// (the built-in plug-in keeps them inline, beside what a message
    /// touches anyway).
    pub fn take_prepaid(&mut self) -> u32 {
        std::mem::take(&mut self.prepaid)
    }

    /// Pays for `n` messages: all of them, or as many as the bucket has
    /// tokens for now, and when it will have the next.
    pub fn pay(&mut self, n: usize) -> Paid {
        let from_prepaid = (self.prepaid as usize).min(n);
        self.prepaid -= from_prepaid as u32;
        let mut owed = n - from_prepaid;
        if owed == 0 {
            return Paid::All;
        }
        // The usual case, one look at the bucket: what is owed and a lease.
        let with_lease = u32::try_from(owed).ok().and_then(|owed| owed.checked_add(self.lease));
        if let Some(ask) = with_lease.and_then(NonZeroU32::new)
            && let Ok(Ok(())) = self.limiter.buckets.check_key_n(&self.bucket, ask)
        {
            self.prepaid = self.lease;
            return Paid::All;
        }
        // Short of tokens: one at a time, as far as they go.
        while owed > 0 {
            match self.limiter.buckets.check_key(&self.bucket) {
                Ok(()) => owed -= 1,
                Err(not_until) => {
                    let clock = self.limiter.buckets.clock();
                    let wait = not_until.wait_time_from(clock.now());
                    return Paid::Part {
                        paid: n - owed,
                        retry: Instant::now() + wait,
                    };
                }
            }
        }
        Paid::All
    }
}

/// A client's bucket address: an IPv6 client by its /64 (one host may use
/// any address of it), an IPv4 client by its address.
fn network_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
    }
}

/// The entries of `X-Forwarded-For` in order, or, without one, the `for=`
/// of `Forwarded` (RFC 7239); `None` for an entry that is no address
/// (`unknown`, an obfuscated name, garbage).
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let values = |name| headers.get_all(name).iter().filter_map(|value| value.to_str().ok());
    let from_xff: Vec<Option<IpAddr>> = values("x-forwarded-for")
        .flat_map(|value| value.split(','))
        .map(|entry| address_of(entry.trim()))
        .collect();
    if !from_xff.is_empty() {
        return from_xff;
    }
    values("forwarded")
        .flat_map(|value| value.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                key.eq_ignore_ascii_case("for")
                    .then(|| address_of(value.trim_matches('"')))
            })
        })
        .collect()
}

/// `192.0.2.60`, `192.0.2.60:80`, `2001:db8::1`, `[2001:db8::1]:4711`.
fn address_of(node: &str) -> Option<IpAddr> {
    if let Ok(address) = node.parse() {
        return Some(address);
    }
    let host = match node.strip_prefix('[') {
        Some(rest) => rest.split(']').next()?,
        None => node.rsplit_once(':')?.0,
    };
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn a_forwarded_address_is_believed_only_from_a_trusted_proxy() {
        let limits = RateLimits::new(LimitSettings {
            calls: (NonZeroU32::new(1), None),
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        });
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "198.51.100.7".parse().unwrap();
        let xff = headers(&[("x-forwarded-for", "203.0.113.9, 10.9.9.9")]);
        assert_eq!(
            limits.client_address(Some(proxy), &xff),
            Some("203.0.113.9".parse().unwrap())
        );
        assert_eq!(
            limits.client_address(Some(stranger), &xff),
            Some(stranger),
            "not trusted"
        );
        let forwarded = headers(&[("forwarded", r#"for="[2001:db8::1]:4711";proto=https, for=10.2.2.2"#)]);
        assert_eq!(
            limits.client_address(Some(proxy), &forwarded),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            limits.client_address(Some(proxy), &HeaderMap::new()),
            Some(proxy),
            "nothing forwarded"
        );
        // A proxy that writes ports: the client's own entry cannot pass for the real one.
        let ported = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9:5555")]);
        assert_eq!(
            limits.client_address(Some(proxy), &ported),
            Some("203.0.113.9".parse().unwrap())
        );
        // An entry that is no address ends the walk: nothing left of it is believed.
        let unknown = headers(&[("x-forwarded-for", "6.6.6.6, unknown, 10.3.3.3")]);
        assert_eq!(
            limits.client_address(Some(proxy), &unknown),
            Some("10.3.3.3".parse().unwrap())
        );
    }

    #[test]
    fn a_bucket_refuses_past_its_burst_and_buckets_are_per_caller() {
        let limits = RateLimits::new(LimitSettings {
            calls: (NonZeroU32::new(1), NonZeroU32::new(2)),
            ..Default::default()
        });
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let two: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(limits.take_call(&Caller::Anonymous, Some(one)).is_ok());
        assert!(limits.take_call(&Caller::Anonymous, Some(one)).is_ok());
        let refused = limits.take_call(&Caller::Anonymous, Some(one)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--limit-calls-per-second"), "{refused:?}");
        assert!(
            limits.take_call(&Caller::Anonymous, Some(two)).is_ok(),
            "another client's bucket"
        );
        // IPv6: one bucket per /64.
        let (a, b): (IpAddr, IpAddr) = ("2001:db8::1".parse().unwrap(), "2001:db8::ffff:2".parse().unwrap());
        assert!(limits.take_call(&Caller::Anonymous, Some(a)).is_ok());
        assert!(limits.take_call(&Caller::Anonymous, Some(b)).is_ok());
        assert!(limits.take_call(&Caller::Anonymous, Some(a)).is_err(), "the same /64");
        assert!(
            RateLimits::default().take_call(&Caller::Anonymous, Some(one)).is_ok(),
            "off"
        );
    }
}
