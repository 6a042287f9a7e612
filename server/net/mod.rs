//! Sockets: the accept loop, what each connection owes (a first request in
//! time, a request now and then), and TLS.

pub mod connection;
pub mod listener;
pub mod message_buffer;
pub mod tls;
