//! Local routes: makes an address that no interface holds one of this machine's own, so that a
//! socket can listen on it and packets sent to it from anywhere that routes to the machine (a
//! container on a Docker bridge network, whose gateway is this machine) are delivered here.
//!
//! A [`LocalRoute`] is a host route of type `local` in the kernel's local table, on the loopback
//! interface: what `ip route add local 10.96.0.7/32 dev lo` makes, written over rtnetlink. It is
//! marked with orch's own routing protocol number, [`ROUTE_PROTOCOL`] (`ip route show table local
//! proto 111` lists them), and removed when the value is dropped. Adding one takes
//! `CAP_NET_ADMIN`. All of `127.0.0.0/8` is already local on Linux and needs none.

use std::io;
use std::net::IpAddr;
use std::os::fd::OwnedFd;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// The routing protocol number orch's local routes carry (`proto 111` in `ip route`).
pub const ROUTE_PROTOCOL: u8 = 111;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RT_TABLE_LOCAL: u8 = 255;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A local route for one address, removed when dropped (see the [module](self)).
#[derive(Debug)]
#[must_use = "the route is removed when this value is dropped"]
pub struct LocalRoute {
    addr: IpAddr,
}

impl LocalRoute {
    /// Makes `addr` local to this machine. A route the kernel already has for it (one an
    /// earlier run left when it was killed) is taken over: removed when this value is dropped,
    /// if it is orch's (an interface's own address is never removed). Fails with the kernel's
    /// reason: `Operation not permitted` without `CAP_NET_ADMIN`.
    pub fn add(addr: IpAddr) -> io::Result<LocalRoute> {
        match request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, addr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(LocalRoute { addr })
    }

    /// The address made local.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
}

impl Drop for LocalRoute {
    fn drop(&mut self) {
        if let Err(e) = request(RTM_DELROUTE, 0, self.addr)
            && e.raw_os_error() != Some(3)
        {
            // ESRCH (3): someone removed it already.
            tracing::warn!(addr = %self.addr, error = %e, "cannot remove a local route");
        }
    }
}

/// The loopback interface's index.
fn loopback_index() -> io::Result<u32> {
    let probe = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
    rustix::net::netdevice::name_to_index(&probe, "lo").map_err(io::Error::from)
}

/// The rtnetlink message for `kind` (new or delete) of the local route to `addr` on `lo`.
fn message(kind: u16, flags: u16, addr: IpAddr, oif: u32, seq: u32) -> Vec<u8> {
    let (family, bytes): (u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    };
    let mut m = Vec::with_capacity(64);
    // struct nlmsghdr: the length is filled in at the end.
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let prefix = (bytes.len() * 8) as u8;
    m.extend_from_slice(&[family, prefix, 0, 0, RT_TABLE_LOCAL, ROUTE_PROTOCOL, RT_SCOPE_HOST, RTN_LOCAL]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    attribute(&mut m, RTA_DST, &bytes);
    attribute(&mut m, RTA_OIF, &oif.to_ne_bytes());
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_ne_bytes());
    m
}

fn attribute(m: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    m.extend_from_slice(&(len as u16).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(payload);
    m.resize(m.len() + (4 - len % 4) % 4, 0);
}

/// Sends one route request and reads the kernel's acknowledgement.
fn request(kind: u16, flags: u16, addr: IpAddr) -> io::Result<()> {
    let fd: OwnedFd = rustix::net::socket_with(AddressFamily::NETLINK, SocketType::RAW, SocketFlags::CLOEXEC, None)?;
    let seq = 1;
    let msg = message(kind, flags, addr, loopback_index()?, seq);
    rustix::net::sendto(&fd, &msg, SendFlags::empty(), &SocketAddrNetlink::new(0, 0))?;
    let mut buf = [0u8; 4096];
    loop {
        let (got, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "rtnetlink closed without an answer"));
        }
        if let Some(result) = acknowledgement(&buf[..got], seq) {
            return result;
        }
    }
}

/// The outcome in a reply to request `seq`, if the reply holds it: the kernel answers with an
/// `NLMSG_ERROR` message whose error is 0 for success or a negated errno.
fn acknowledgement(reply: &[u8], seq: u32) -> Option<io::Result<()>> {
    let mut at = 0;
    while at + 16 <= reply.len() {
        let word = |o: usize| u32::from_ne_bytes(reply[o..o + 4].try_into().expect("four bytes"));
        let len = word(at) as usize;
        let kind = u16::from_ne_bytes([reply[at + 4], reply[at + 5]]);
        if len < 16 || at + len > reply.len() {
            return Some(Err(io::Error::new(io::ErrorKind::InvalidData, "a malformed netlink reply")));
        }
        if kind == NLMSG_ERROR && word(at + 8) == seq && len >= 20 {
            let code = i32::from_ne_bytes(reply[at + 16..at + 20].try_into().expect("four bytes"));
            return Some(if code == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(code.saturating_neg())) });
        }
        at += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_a_host_route_of_type_local_on_the_loopback_interface() {
        let m = message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, "10.96.0.7".parse().unwrap(), 1, 9);
        // header 16 + rtmsg 12 + RTA_DST 8 + RTA_OIF 8
        assert_eq!(m.len(), 44);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()), 44);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWROUTE);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        assert_eq!(&m[16..24], &[AF_INET, 32, 0, 0, RT_TABLE_LOCAL, ROUTE_PROTOCOL, RT_SCOPE_HOST, RTN_LOCAL]);
        assert_eq!(&m[28..30], &8u16.to_ne_bytes());
        assert_eq!(&m[30..32], &RTA_DST.to_ne_bytes());
        assert_eq!(&m[32..36], &[10, 96, 0, 7]);
        assert_eq!(&m[36..44], &[&8u16.to_ne_bytes()[..], &RTA_OIF.to_ne_bytes(), &1u32.to_ne_bytes()].concat()[..]);
        let v6 = message(RTM_DELROUTE, 0, "fd00::7".parse().unwrap(), 1, 9);
        assert_eq!((v6.len(), v6[16], v6[17]), (56, AF_INET6, 128));
    }

    #[test]
    fn acknowledgements_give_success_the_kernels_error_or_nothing_for_other_messages() {
        let ack = |seq: u32, code: i32| {
            let mut r = Vec::new();
            r.extend_from_slice(&36u32.to_ne_bytes());
            r.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            r.extend_from_slice(&0u16.to_ne_bytes());
            r.extend_from_slice(&seq.to_ne_bytes());
            r.extend_from_slice(&0u32.to_ne_bytes());
            r.extend_from_slice(&code.to_ne_bytes());
            r.extend_from_slice(&[0; 16]);
            r
        };
        assert!(matches!(acknowledgement(&ack(1, 0), 1), Some(Ok(()))));
        let refused = acknowledgement(&ack(1, -1), 1).unwrap().unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied);
        assert!(acknowledgement(&ack(2, 0), 1).is_none(), "another request's answer");
        assert!(acknowledgement(&[0; 8], 1).is_none(), "too short to hold a message");
        let mut bad = ack(1, 0);
        bad[..4].copy_from_slice(&400u32.to_ne_bytes());
        assert!(acknowledgement(&bad, 1).unwrap().is_err(), "a length past the end");
    }
}
