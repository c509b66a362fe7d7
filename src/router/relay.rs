//! One client connection: pick a routable backend (holding the client while
//! there is none), connect, then copy bytes both ways until either side
//! closes or the backend's fence token fires.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
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
    let (mut up, mut down) = (0u64, 0u64);
    let fenced = {
        let both = async {
            tokio::try_join!(
                pump(&client, &server, &mut up),
                pump(&server, &client, &mut down)
            )
        };
        tokio::select! {
            result = both => {
                if let Err(err) = result {
                    debug!(%peer, backend = %assignment.backend, error = %err, "router: relay ended");
                }
                false
            }
            () = assignment.fence.cancelled() => true,
        }
    };
    assignment.open.fetch_sub(1, Ordering::Relaxed);
    metrics.relayed(up + down);
    if fenced && !shared.shutdown.is_cancelled() {
        metrics.fenced();
        debug!(%peer, backend = %assignment.backend, "router: connection closed by fence");
    }
}

/// Bytes one read may take: a buffer is borrowed only while a side has
/// data, so an idle connection holds none (10,000 idle clients cost their
/// sockets and tasks, not 10,000 pairs of buffers).
const CHUNK: usize = 64 * 1024;

/// Copies `from` to `to` until `from` ends, then ends `to`'s write side (as
/// a half-close: the other direction goes on). Counts into `bytes`.
async fn pump(from: &TcpStream, to: &TcpStream, bytes: &mut u64) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buf = Vec::with_capacity(CHUNK);
        // Everything readable now, then back to waiting without a buffer.
        loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    // Peer finished sending: pass the end on.
                    return match SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
                        _ => Ok(()),
                    };
                }
                Ok(n) => {
                    *bytes += n as u64;
                    write_all(to, &buf).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
