//! What keeps the server observable and stoppable, whatever it serves:
//! live calls, their metrics and traces, health and reflection, shutdown.

pub mod calls;
pub mod health;
pub mod metrics;
pub mod shutdown;
pub mod traces;
