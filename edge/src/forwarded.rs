//! Which client a request comes from: the TCP peer, or behind a trusted
//! proxy the address it reports in `X-Forwarded-For`, and the key that
//! address is rate-limited under.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::http::HeaderMap;
use chat_shared::netaddr::IpRange;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The client's address. Only when `peer` is a trusted proxy is
/// `X-Forwarded-For` read, right to left: each proxy appends the address
/// it was connected from, so the right-most address that is not itself a
/// trusted proxy is the first one nobody trusted could have written; what
/// lies left of it is the client's to invent. An unreadable entry ends the
/// walk at the last trusted hop: the request is then limited as that
/// proxy's, never as an address someone chose.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpRange]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|range| range.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(client) {
        return client;
    }
    // Several headers are one list, in order (RFC 9110 5.3).
    for value in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        let Ok(value) = value.to_str() else {
            return client;
        };
        for hop in value.rsplit(',') {
            let Some(ip) = parse_hop(hop) else {
                return client;
            };
            client = ip;
            if !is_trusted(ip) {
                return client;
            }
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, maybe with a port
/// (`203.0.113.7:4711`, `[2001:db8::1]:443`) or in brackets.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    let ip = hop
        .parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .or_else(|_| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(hop)
                .parse::<IpAddr>()
        })
        .ok()?;
    Some(ip.to_canonical())
}

/// The key an address is rate-limited under: an IPv4 address itself, an
/// IPv6 address its /64 (one subscriber's usual assignment: a client
/// holding a /64 could otherwise take a fresh address per connection).
pub fn rate_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(X_FORWARDED_FOR, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn trusted() -> Vec<IpRange> {
        vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()]
    }

    #[test]
    fn an_untrusted_peers_header_is_ignored() {
        let spoofed = forwarded(&["1.2.3.4"]);
        assert_eq!(
            client_ip(ip("198.51.100.9"), &spoofed, &trusted()),
            ip("198.51.100.9")
        );
        assert_eq!(
            client_ip(ip("198.51.100.9"), &spoofed, &[]),
            ip("198.51.100.9")
        );
    }

    #[test]
    fn behind_trusted_proxies_the_right_most_untrusted_hop_is_the_client() {
        let proxy = ip("10.0.0.2");
        let t = trusted();
        // The client wrote "6.6.6.6" itself; the load balancer appended
        // the address it saw, then an inner proxy its own.
        let headers = forwarded(&["6.6.6.6, 203.0.113.7", "10.0.0.1"]);
        assert_eq!(client_ip(proxy, &headers, &t), ip("203.0.113.7"));
        let one = forwarded(&["6.6.6.6,203.0.113.7:4711"]);
        assert_eq!(client_ip(proxy, &one, &t), ip("203.0.113.7"));
        let v6 = forwarded(&["[2001:db8::7]:443"]);
        assert_eq!(client_ip(ip("::1"), &v6, &t), ip("2001:db8::7"));
        let mapped = forwarded(&["::ffff:203.0.113.8"]);
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.3"), &mapped, &t),
            ip("203.0.113.8")
        );
    }

    #[test]
    fn without_a_usable_header_a_trusted_peer_is_the_client() {
        let proxy = ip("10.0.0.2");
        let t = trusted();
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &t), proxy);
        // Garbage right of the client's entry: the walk stops at the last
        // trusted hop instead of believing what lies left of it.
        let garbage = forwarded(&["203.0.113.7, unknown"]);
        assert_eq!(client_ip(proxy, &garbage, &t), proxy);
        let behind = forwarded(&["203.0.113.7, nonsense, 10.0.0.1"]);
        assert_eq!(client_ip(proxy, &behind, &t), ip("10.0.0.1"));
        // Only trusted hops: the left-most of them.
        let inner = forwarded(&["10.0.0.5, 10.0.0.1"]);
        assert_eq!(client_ip(proxy, &inner, &t), ip("10.0.0.5"));
    }

    #[test]
    fn ipv6_clients_share_a_key_per_64() {
        assert_eq!(rate_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            rate_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            rate_key(ip("2001:db8:1:2::9"))
        );
        assert_ne!(
            rate_key(ip("2001:db8:1:3::1")),
            rate_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(rate_key(ip("203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(rate_key(ip("::ffff:203.0.113.7")), ip("203.0.113.7"));
    }
}
