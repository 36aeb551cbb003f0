//! Names outside the cluster domain: the query as it came, to each upstream in turn over UDP,
//! and again over TCP when the UDP answer was truncated.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_server::proto::op::Message;

pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

impl Forwarder {
    pub(crate) fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Forwarder { upstreams, timeout }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The first answer from an upstream (with the query's id), or `None` when none answered.
    pub(crate) async fn ask(&self, query: &[u8]) -> Option<Message> {
        let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
        for upstream in &self.upstreams {
            match tokio::time::timeout(self.timeout, ask_one(*upstream, query, id)).await {
                Ok(Ok(m)) if m.metadata.truncation => {
                    match tokio::time::timeout(self.timeout, ask_tcp(*upstream, query, id)).await {
                        Ok(Ok(full)) => return Some(full),
                        // The truncated answer is still an answer: the client may ask over TCP.
                        _ => return Some(m),
                    }
                }
                Ok(Ok(m)) => return Some(m),
                Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "upstream DNS server failed"),
                Err(_) => tracing::debug!(%upstream, "upstream DNS server timed out"),
            }
        }
        None
    }
}

/// The largest UDP datagram: an upstream may answer up to the EDNS size the client advertised
/// (passed on unchanged), which can be far above 4096.
const UDP_BUFFER: usize = 65535;

async fn ask_one(upstream: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Message> {
    let local: SocketAddr =
        if upstream.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = tokio::net::UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Anything but the answer to this query (a late reply, a spoof) is skipped.
        match Message::from_vec(&buf[..n]) {
            Ok(m) if m.metadata.id == id => return Ok(m),
            _ => continue,
        }
    }
}

async fn ask_tcp(upstream: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Message> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let len = u16::try_from(query.len()).map_err(|_| std::io::Error::other("query too long"))?;
    let mut s = tokio::net::TcpStream::connect(upstream).await?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    s.write_all(&framed).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await?;
    match Message::from_vec(&buf) {
        Ok(m) if m.metadata.id == id => Ok(m),
        _ => Err(std::io::Error::other("not the answer to this query")),
    }
}
