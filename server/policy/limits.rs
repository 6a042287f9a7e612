//! Call rate limits (`--limit-calls-per-second`, `--limit-calls-burst`): a
//! token bucket per caller, `governor`'s (GCRA, lock-free per key). A
//! caller is its JWT's `sub`, or "whoever has the shared token", or,
//! without either, its client address: the TCP peer's, or, when the peer
//! is a proxy listed in `--trusted-proxy`, the address that proxy says it
//! forwards for (`X-Forwarded-For`, else `Forwarded: for=`), read from the
//! right past every trusted hop. A new call over the limit is refused at
//! once with RESOURCE_EXHAUSTED; calls already live are not touched.
//!
//! Buckets of callers that have been quiet longer than their bucket takes
//! to refill are forgotten every minute, so their number stays bounded by
//! the callers of the last minute.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use ipnet::IpNet;

use super::auth::Caller;

/// Whose bucket a call is taken from.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Bucket {
    Subject(Arc<str>),
    SharedToken,
    Address(IpAddr),
}

/// The call limits in force; nothing when no limit is set.
#[derive(Clone, Debug, Default)]
pub struct CallLimits {
    limiter: Option<Arc<DefaultKeyedRateLimiter<Bucket>>>,
    per_second: u32,
    trusted_proxies: Arc<[IpNet]>,
}

impl CallLimits {
    pub fn new(per_second: Option<NonZeroU32>, burst: Option<NonZeroU32>, trusted_proxies: Vec<IpNet>) -> CallLimits {
        let limiter = per_second.map(|rate| {
            let quota = Quota::per_second(rate).allow_burst(burst.unwrap_or(rate));
            Arc::new(RateLimiter::keyed(quota))
        });
        CallLimits {
            limiter,
            per_second: per_second.map_or(0, NonZeroU32::get),
            trusted_proxies: trusted_proxies.into(),
        }
    }

    pub fn is_on(&self) -> bool {
        self.limiter.is_some()
    }

    /// The client's address: `peer`, or, if `peer` is a trusted proxy, the
    /// address it forwards for.
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

    /// Takes one call from `caller`'s bucket (its address's, if anonymous);
    /// RESOURCE_EXHAUSTED if the bucket is empty.
    pub fn take_call(&self, caller: &Caller, client: Option<IpAddr>) -> Result<(), tonic::Status> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        let by_address = || client.map(|address| (Bucket::Address(network_of(address)), "this client address"));
        let chosen = match caller {
            Caller::Identity(identity) => match identity.claim_text("sub") {
                Some(sub) => Some((Bucket::Subject(sub.into()), "this caller (its token's sub)")),
                None => by_address(),
            },
            Caller::Token => Some((Bucket::SharedToken, "the shared token's holders")),
            Caller::Anonymous => by_address(),
        };
        let Some((bucket, who)) = chosen else { return Ok(()) };
        limiter.check_key(&bucket).map_err(|_| {
            tonic::Status::resource_exhausted(format!(
                "call rate limit reached for {who}: {} new calls a second (--limit-calls-per-second); retry later",
                self.per_second
            ))
        })
    }

    /// Forgets the buckets of callers quiet long enough to be full again,
    /// every minute until `shutdown`.
    pub async fn forget_idle(self, shutdown: tokio_util::sync::CancellationToken) {
        let Some(limiter) = self.limiter else { return };
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            }
        }
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
        let limits = CallLimits::new(NonZeroU32::new(1), None, vec!["10.0.0.0/8".parse().unwrap()]);
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
        let limits = CallLimits::new(NonZeroU32::new(1), NonZeroU32::new(2), Vec::new());
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
            CallLimits::default().take_call(&Caller::Anonymous, Some(one)).is_ok(),
            "off"
        );
    }
}
