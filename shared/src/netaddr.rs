//! Address ranges (`10.0.0.0/8`, `2001:db8::/32`, or one address) for
//! settings such as `CHAT_TRUSTED_PROXIES`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address and the number of leading bits that must match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    addr: IpAddr,
    prefix: u8,
}

impl IpRange {
    /// Whether `ip` is in the range. An IPv4 address written as IPv6
    /// (`::ffff:10.0.0.1`, what a dual-stack socket reports) counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(range), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(range)), 32, self.prefix)
                    == masked(u128::from(u32::from(ip)), 32, self.prefix)
            }
            (IpAddr::V6(range), IpAddr::V6(ip)) => {
                masked(u128::from(range), 128, self.prefix)
                    == masked(u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

/// The top `prefix` bits of a `width`-bit number.
fn masked(bits: u128, width: u8, prefix: u8) -> u128 {
    let dropped = u32::from(width.saturating_sub(prefix));
    bits.checked_shr(dropped).unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address or an address/prefix range")]
pub struct BadRange(String);

impl FromStr for IpRange {
    type Err = BadRange;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadRange(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let addr = addr.to_canonical();
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(prefix) => prefix.parse::<u8>().map_err(|_| bad())?,
        };
        if prefix > width {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_match_by_prefix() {
        let private: IpRange = "10.0.0.0/8".parse().unwrap();
        assert!(private.contains(ip("10.200.3.4")));
        assert!(private.contains(ip("::ffff:10.1.1.1")), "v4-mapped is v4");
        assert!(!private.contains(ip("11.0.0.1")));
        assert!(
            !private.contains(ip("::a00:1")),
            "v6 never matches a v4 range"
        );
        let one: IpRange = "127.0.0.1".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: IpRange = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        let all: IpRange = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/x",
            "example.com",
            "10.0.0.0/8/1",
        ] {
            assert!(bad.parse::<IpRange>().is_err(), "{bad}");
        }
    }
}
