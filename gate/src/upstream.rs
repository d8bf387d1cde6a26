//! How the gate reaches its broker: over TCP (any MQTT 5 broker, as the gate's own tests run it
//! against Mosquitto) or through an in-process pipe (the node's embedded rumqttd, which then has
//! no TCP listener at all). Either way the gate sees one byte stream per connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::TcpStream;

/// Opens a new in-process connection to the broker.
pub type Pipe = Arc<dyn Fn() -> std::io::Result<DuplexStream> + Send + Sync>;

/// Where the broker is.
#[derive(Clone)]
pub enum Broker {
    /// An MQTT 5 listener.
    Tcp(SocketAddr),
    /// An in-process MQTT 5 server.
    InProcess(Pipe),
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broker::Tcp(a) => write!(f, "{a}"),
            Broker::InProcess(_) => f.write_str("in-process"),
        }
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Broker({self})")
    }
}

impl Broker {
    /// A new connection (nothing sent yet).
    pub(crate) async fn connect(&self) -> std::io::Result<BrokerStream> {
        match self {
            Broker::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                // Small packets both ways: Nagle would hold them for tens of milliseconds.
                s.set_nodelay(true)?;
                Ok(BrokerStream::Tcp(s))
            }
            Broker::InProcess(pipe) => Ok(BrokerStream::Pipe(pipe()?)),
        }
    }
}

/// One connection to the broker.
pub(crate) enum BrokerStream {
    Tcp(TcpStream),
    Pipe(DuplexStream),
}

impl AsyncRead for BrokerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BrokerStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            BrokerStream::Pipe(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BrokerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BrokerStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            BrokerStream::Pipe(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BrokerStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            BrokerStream::Pipe(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BrokerStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            BrokerStream::Pipe(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BrokerStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BrokerStream::Pipe(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BrokerStream::Tcp(s) => s.is_write_vectored(),
            BrokerStream::Pipe(s) => s.is_write_vectored(),
        }
    }
}
