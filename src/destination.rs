//! Refusing non-global destinations (CONTRACT §4), so that a webhook URL can never reach
//! the network the worker runs in: literal addresses are checked before any request, and
//! names go through a resolver that drops non-global addresses, so the address connected
//! to is always one that was checked (DNS rebinding cannot pass).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why a destination was refused; found in a request error's source chain.
#[derive(Debug, thiserror::Error)]
#[error("blocked destination: {0}")]
pub struct Blocked(pub String);

/// True for addresses on the public internet; false for loopback, private, link-local,
/// CGNAT, multicast, unspecified, documentation, benchmarking and other reserved ranges,
/// IPv4 addresses embedded in IPv6 included.
pub fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => is_global_v6(v6),
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                   // "this network", 0.0.0.0/8
        || a == 10                             // private
        || a == 127                            // loopback
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 169 && b == 254)              // link-local
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)      // documentation
        || (a == 192 && b == 88 && c == 99)    // 6to4 relay anycast
        || (a == 192 && b == 168)              // private
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100)   // documentation
        || (a == 203 && b == 0 && c == 113)    // documentation
        || a >= 224) // multicast, reserved, broadcast
}

fn is_global_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d)
    // carry an IPv4 address: judge that one.
    if s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        if s[5] == 0 && s[6] == 0 {
            return false; // :: and ::1 and the rest of ::/96's low end
        }
        return is_global_v4(embedded_v4(s));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_global_v4(embedded_v4(s));
    }
    // 6to4 (2002::/16) embeds the IPv4 address in segments 1 and 2.
    if s[0] == 0x2002 {
        let [a, b] = s[1].to_be_bytes();
        let [c, d] = s[2].to_be_bytes();
        return is_global_v4(Ipv4Addr::new(a, b, c, d));
    }
    // Only 2000::/3 is global unicast, less its special-purpose blocks.
    (s[0] & 0xe000) == 0x2000
        && !(s[0] == 0x2001 && s[1] < 0x0200) // 2001::/23 IETF protocol assignments (Teredo, ORCHID, benchmarking)
        && !(s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        && !(s[0] == 0x3fff && s[1] < 0x1000) // documentation 3fff::/20
}

fn embedded_v4(s: [u16; 8]) -> Ipv4Addr {
    let [a, b] = s[6].to_be_bytes();
    let [c, d] = s[7].to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// Checks a literal address from a URL (any spelling the URL parser accepts, such as
/// `2130706433`, `0x7f.1` or `[::ffff:127.0.0.1]`, arrives here normalised).
pub fn check_literal(ip: IpAddr) -> Result<(), Blocked> {
    if is_global(ip) {
        Ok(())
    } else {
        Err(Blocked(format!("{ip} is a non-global address")))
    }
}

/// Checks a URL whose host is a literal address; names are checked when resolved.
pub fn check_url(url: &url::Url) -> Result<(), Blocked> {
    match url.host() {
        Some(url::Host::Ipv4(v4)) => check_literal(v4.into()),
        Some(url::Host::Ipv6(v6)) => check_literal(v6.into()),
        _ => Ok(()),
    }
}

/// Keeps the global addresses of a name; refuses the name if none is left.
pub fn filter(name: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Blocked> {
    let total = addrs.len();
    let global: Vec<SocketAddr> = addrs.into_iter().filter(|a| is_global(a.ip())).collect();
    if global.is_empty() && total > 0 {
        return Err(Blocked(format!(
            "{name} resolves only to non-global addresses"
        )));
    }
    Ok(global)
}

/// A DNS resolver for the HTTP client that never hands it a non-global address.
#[derive(Debug, Default, Clone)]
pub struct GlobalOnlyResolver;

impl Resolve for GlobalOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = filter(&host, addrs)?;
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_every_non_global_range() {
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "127.0.0.1",
            "127.1.2.3",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.1",
            "198.51.100.1",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2002:a00:1::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "ff05::2",
            "2001:db8::1",
            "2001::1",
            "2001:10::1",
            "2001:2::1",
            "100::1",
            "3fff::1",
        ] {
            assert!(!is_global(ip(s)), "{s} must be refused");
        }
    }

    #[test]
    fn allows_global_addresses() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.0.1",
            "172.32.0.1",
            "192.0.1.1",
            "192.169.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "2001:4860:4860::8888",
        ] {
            assert!(is_global(ip(s)), "{s} must be allowed");
        }
    }

    #[test]
    fn odd_spellings_of_loopback_normalise_to_a_refused_literal() {
        for url in [
            "http://2130706433/",
            "http://0x7f.0.0.1/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::]/",
            "http://0/",
        ] {
            let parsed = url::Url::parse(url).unwrap();
            assert!(
                !matches!(parsed.host(), Some(url::Host::Domain(_))),
                "{url} must parse as an address"
            );
            assert!(check_url(&parsed).is_err(), "{url} -> {:?}", parsed.host());
        }
    }

    #[test]
    fn names_are_left_to_the_resolver() {
        assert!(check_url(&url::Url::parse("http://localhost:8080/").unwrap()).is_ok());
        assert!(check_url(&url::Url::parse("https://8.8.8.8/").unwrap()).is_ok());
    }

    #[test]
    fn the_resolver_filter_keeps_only_global_addresses() {
        let addrs = |list: &[&str]| {
            list.iter()
                .map(|s| SocketAddr::new(ip(s), 443))
                .collect::<Vec<_>>()
        };
        let kept = filter(
            "mixed.example",
            addrs(&["10.0.0.1", "8.8.8.8", "::1", "2606:4700::1"]),
        )
        .unwrap();
        assert_eq!(kept, addrs(&["8.8.8.8", "2606:4700::1"]));
        let err = filter(
            "rebind.example",
            addrs(&["127.0.0.1", "169.254.169.254", "fd00::1"]),
        )
        .unwrap_err();
        assert!(err.0.contains("only to non-global"), "{err}");
    }
}
