//! How a call can fail, and the one place each failure is mapped to the wire:
//! a gRPC status code (all transports report one) and, for WebSockets, a close
//! code. `docs/websocket-protocol.md` has the same table for client authors.
//!
//! | error                  | gRPC status            | WebSocket close |
//! |------------------------|------------------------|-----------------|
//! | `InvalidFrame`         | 3 INVALID_ARGUMENT     | 1007            |
//! | `AfterCloseSend`     | 3 INVALID_ARGUMENT     | 1007            |
//! | `WrongFrameType`       | 3 INVALID_ARGUMENT     | 1003            |
//! | `ProtocolViolation`    | 3 INVALID_ARGUMENT     | 1002            |
//! | `MessageTooLarge`      | 8 RESOURCE_EXHAUSTED   | 1009            |
//! | `ShuttingDown`         | 14 UNAVAILABLE         | 1001            |
//! | `Internal`             | 13 INTERNAL            | 1011            |

use streambridge_protocol::{DecodeError, Subprotocol};
use tonic::Code;

/// Why a call ended other than normally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame that does not decode as a `ClientFrame` of the subprotocol
    /// (including a text frame that is not valid UTF-8).
    #[error("{0}")]
    InvalidFrame(#[from] DecodeError),

    /// A request (or a second `closeSend`) after the client's `closeSend`.
    #[error("{0} after closeSend: the client had already half-closed the call")]
    AfterCloseSend(&'static str),

    /// A text frame on the proto subprotocol, or a binary one on json.
    #[error("{received} frame on subprotocol {subprotocol}, which carries {expected} frames only")]
    WrongFrameType {
        received: &'static str,
        expected: &'static str,
        subprotocol: Subprotocol,
    },

    /// A WebSocket protocol error (unmasked client frame, reserved bits, ...).
    #[error("WebSocket protocol violation: {0}")]
    ProtocolViolation(String),

    /// A message larger than the configured limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge { size: usize, limit: usize },

    /// The server is draining before it exits.
    #[error("server is shutting down; reconnect and retry")]
    ShuttingDown,

    /// A fault of the server's, not the client's.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The gRPC status code the client sees.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidFrame(_)
            | Error::AfterCloseSend(_)
            | Error::WrongFrameType { .. }
            | Error::ProtocolViolation(_) => Code::InvalidArgument,
            Error::MessageTooLarge { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The WebSocket close code (RFC 6455 section 7.4.1) the socket ends with.
    pub fn close_code(&self) -> u16 {
        match self {
            Error::InvalidFrame(_) | Error::AfterCloseSend(_) => 1007,
            Error::WrongFrameType { .. } => 1003,
            Error::ProtocolViolation(_) => 1002,
            Error::MessageTooLarge { .. } => 1009,
            Error::ShuttingDown => 1001,
            Error::Internal(_) => 1011,
        }
    }
}

/// The close code of a protocol v1 socket whose call ended with `code`
/// (the call is the socket's only one: its end is the socket's). The same
/// codes as [`Error::close_code`] where an [`Error`] has that status code;
/// a status from elsewhere (a v1 call ends with OK, or with the
/// processor's own status) gets the nearest one.
pub fn close_code_of(code: Code) -> u16 {
    match code {
        Code::Ok | Code::Cancelled => 1000,
        Code::InvalidArgument => 1007,
        Code::ResourceExhausted => 1009,
        Code::Unavailable => 1001,
        _ => 1011,
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        tonic::Status::new(error.code(), error.to_string())
    }
}

/// Corrects the status tonic gives an inbound message over the size limit:
/// tonic says OUT_OF_RANGE, the gRPC spec (and every other transport here)
/// says RESOURCE_EXHAUSTED. Other statuses pass unchanged.
pub fn grpc_inbound_status(status: tonic::Status) -> tonic::Status {
    if status.code() == Code::OutOfRange && status.message().contains("too large") {
        tonic::Status::new(Code::ResourceExhausted, status.message())
    } else {
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_oversize_status_becomes_resource_exhausted_with_its_message() {
        let tonic_says = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        );
        let status = grpc_inbound_status(tonic_says);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("found 9 bytes"));
        assert_eq!(
            grpc_inbound_status(tonic::Status::cancelled("x")).code(),
            Code::Cancelled
        );
        // Only tonic's size refusal is corrected: both conditions matter.
        assert_eq!(
            grpc_inbound_status(tonic::Status::out_of_range("index 9 of 3")).code(),
            Code::OutOfRange
        );
        assert_eq!(
            grpc_inbound_status(tonic::Status::internal("frame too large")).code(),
            Code::Internal
        );
    }

    #[test]
    fn every_error_maps_to_a_non_ok_status_and_an_error_close_code() {
        let errors = [
            Error::InvalidFrame(DecodeError("x".into())),
            Error::AfterCloseSend("request"),
            Error::WrongFrameType {
                received: "text",
                expected: "binary",
                subprotocol: Subprotocol::Proto,
            },
            Error::ProtocolViolation("x".into()),
            Error::MessageTooLarge { size: 2, limit: 1 },
            Error::ShuttingDown,
            Error::Internal("x".into()),
        ];
        for error in errors {
            assert_ne!(error.code(), Code::Ok, "{error}");
            assert!(
                (1001..=1011).contains(&error.close_code()) && error.close_code() != 1000,
                "{error}"
            );
            // Except for the finer 1003 and 1002, a status's code alone gives the same close code.
            if !matches!(error, Error::WrongFrameType { .. } | Error::ProtocolViolation(_)) {
                assert_eq!(close_code_of(error.code()), error.close_code(), "{error}");
            }
        }
    }
}
