//! Who may call: the bearer token and the origin policy, applied by every
//! transport before a call starts.

pub mod auth;
pub mod jwks_url;
pub mod jwt;
pub mod limits;
pub mod origin;
pub mod pace;
pub mod rules;
