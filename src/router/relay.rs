//! One client connection: pick a routable backend (holding the client while
//! there is none), connect, then copy bytes both ways until either side
//! closes or the backend's fence token fires.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::fencing::{Assignment, Routing};
use super::metrics::Listener;
use super::Shared;

/// Pause before connecting again to a backend that refused or timed out,
/// unless the route changes first.
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// TCP_NODELAY (the protocol is request/response: no Nagle delay) and
/// keepalives, so a peer that vanished is noticed even while idle.
pub(super) fn tune(stream: &TcpStream, keepalive: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let params = TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(keepalive);
    SockRef::from(stream).set_tcp_keepalive(&params)
}

/// Serves one accepted client until it is relayed and closed, or given up.
pub(super) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    listener: Listener,
    shared: Arc<Shared>,
) {
    let Some((server, assignment)) = connect_routed(peer, listener, &shared).await else {
        return; // dropping `client` closes it
    };
    relay(client, server, peer, listener, &assignment, &shared).await;
}

/// The backend a new connection of `listener` goes to at `now`.
fn choose(
    routing: &Routing,
    listener: Listener,
    shared: &Shared,
    now: Instant,
) -> Option<Arc<Assignment>> {
    if !routing.is_valid_at(now) {
        return None;
    }
    let chosen = match listener {
        Listener::ReadWrite => routing.primary.clone(),
        Listener::ReadOnly if !routing.replicas.is_empty() => {
            let next = shared.next_replica.fetch_add(1, Ordering::Relaxed);
            Some(Arc::clone(&routing.replicas[next % routing.replicas.len()]))
        }
        Listener::ReadOnly if shared.config.replica_fallback => routing.primary.clone(),
        Listener::ReadOnly => None,
    };
    chosen.filter(|a| !a.fence.is_cancelled())
}

/// Waits (at most `hold_timeout`) for a routable backend that accepts a
/// connection; `None` when the client is to be closed.
async fn connect_routed(
    peer: SocketAddr,
    listener: Listener,
    shared: &Shared,
) -> Option<(TcpStream, Arc<Assignment>)> {
    let metrics = shared.metrics.listener(listener);
    let deadline = tokio::time::Instant::now() + shared.config.hold_timeout;
    let mut routing = shared.routing.clone();
    let mut held = None;
    let mut last_error: Option<(String, io::Error)> = None;
    loop {
        let chosen = choose(
            &routing.borrow_and_update(),
            listener,
            shared,
            Instant::now(),
        );
        if let Some(assignment) = chosen {
            let backend = &assignment.backend;
            let attempt = crate::net::connect_tcp_within(
                &backend.host,
                backend.port,
                shared.config.connect_timeout,
            )
            .await
            .and_then(|stream| tune(&stream, shared.config.keepalive).map(|()| stream));
            match attempt {
                // Fenced while connecting: choose again.
                Ok(_) if assignment.fence.is_cancelled() => continue,
                Ok(stream) => return Some((stream, assignment)),
                Err(err) => {
                    debug!(%peer, backend = %backend, error = %err, "router: backend connect failed; retrying");
                    last_error = Some((backend.to_string(), err));
                }
            }
        }
        held.get_or_insert_with(|| metrics.held());
        let retry = last_error.is_some();
        tokio::select! {
            () = shared.shutdown.cancelled() => return None,
            () = tokio::time::sleep_until(deadline) => {
                match &last_error {
                    Some((backend, err)) => warn!(%peer, listener = listener.label(), backend, error = %err, "router: closing client: no backend accepted a connection within hold_timeout"),
                    None => warn!(%peer, listener = listener.label(), "router: closing client: no routable backend within hold_timeout"),
                }
                return None;
            }
            changed = routing.changed() => {
                if changed.is_err() {
                    return None; // the router is stopping
                }
                last_error = None;
            }
            () = tokio::time::sleep(RETRY_DELAY), if retry => {}
        }
    }
}

/// Copies both ways until a side closes or the backend is fenced; either
/// way both sockets are closed when this returns.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    peer: SocketAddr,
    listener: Listener,
    assignment: &Assignment,
    shared: &Shared,
) {
    let metrics = shared.metrics.listener(listener);
    let _open = metrics.open();
    assignment.open.fetch_add(1, Ordering::Relaxed);
    let mut client = Counted::new(client);
    let mut server = Counted::new(server);
    let fenced = tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            if let Err(err) = result {
                debug!(%peer, backend = %assignment.backend, error = %err, "router: relay ended");
            }
            false
        }
        () = assignment.fence.cancelled() => true,
    };
    assignment.open.fetch_sub(1, Ordering::Relaxed);
    metrics.relayed(client.read + server.read);
    if fenced && !shared.shutdown.is_cancelled() {
        metrics.fenced();
        debug!(%peer, backend = %assignment.backend, "router: connection closed by fence");
    }
}

/// A stream that counts the bytes read from it, in a plain field: one add
/// per read call, read once when the relay ends (also when it is cut off,
/// which `copy_bidirectional`'s own totals would not survive).
struct Counted<S> {
    inner: S,
    read: u64,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Counted { inner, read: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read += (buf.filled().len() - before) as u64;
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
