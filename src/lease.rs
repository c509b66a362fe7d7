//! The leader lease, renewed on its own clock and its own etcd connection.
//!
//! A pass of the agent loop makes several etcd round trips one after the
//! other. On a slow, lossy link one stalled request (a lost segment, the
//! HTTP/2 connection's other streams waiting behind it) held up the renewal
//! that came after it until the fencing deadline passed, while the lease
//! itself was never in danger. The keeper sends a keepalive every `period`
//! whatever the loop is doing, on a connection of its own, without waiting
//! for the previous answer: a lost packet delays one renewal, not the next.
//!
//! It renews only as long as the loop's last decision to lead allows
//! (`renew_until`, pushed forward by every pass that decides to keep the
//! key): a loop that stops deciding stops the renewals and the fence guard
//! fires as before, at most one such window later. Every renewal counts
//! from when it was *sent*. The keeper owns the fence guard and re-arms it
//! after each renewal under the same lock as the lease, so the guard is
//! never armed for a lease the agent already gave up.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{error, info, warn, Instrument};

use crate::dcs::Etcd;
use crate::fence::{Guard, Message};

/// Keepalives in flight at once, at most: beyond that more requests on a
/// link that answers none would only queue behind the others.
const MAX_IN_FLIGHT: usize = 4;

/// A leader lease we hold, and when its last successful renewal was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub lease_id: i64,
    pub renewed_at: Instant,
}

struct State {
    lease: Option<Lease>,
    /// Renewals go out until then; the loop pushes it forward.
    renew_until: Option<Instant>,
    in_flight: usize,
    guard: Option<Guard>,
    /// What `on_change` was last told.
    reported: Option<Lease>,
}

/// Told of every change of the held lease (a renewal, a release), under
/// the keeper's lock: what the API serves follows the guard's deadline.
pub type OnChange = Box<dyn Fn(Option<Lease>) + Send + Sync>;

struct Shared {
    data_dir: PathBuf,
    /// From a renewal's send time to the fencing deadline (ttl − margin).
    fence_window: Duration,
    state: Mutex<State>,
    wake: Notify,
    on_change: OnChange,
}

/// The agent's handle on the keeper task.
pub struct LeaseKeeper {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// How often the keeper renews: four chances before the fencing deadline,
/// and never less often than the loop used to.
pub fn renew_period(fence_window: Duration, loop_wait: Duration) -> Duration {
    (fence_window / 4)
        .min(loop_wait)
        .max(Duration::from_millis(100))
}

impl LeaseKeeper {
    /// Starts the fence guard and the keeper task. `etcd` should be a
    /// connection of its own (`Etcd::connect` again), with a request
    /// timeout of `fence_window`: an answer later than that is useless.
    pub fn spawn(
        etcd: Etcd,
        data_dir: PathBuf,
        fence_window: Duration,
        period: Duration,
        on_change: OnChange,
    ) -> std::io::Result<LeaseKeeper> {
        let guard = Guard::spawn(&data_dir)?;
        info!(
            fence_window_ms = fence_window.as_millis() as u64,
            period_ms = period.as_millis() as u64,
            "leader lease renewed on a connection of its own"
        );
        let shared = Arc::new(Shared {
            data_dir,
            fence_window,
            state: Mutex::new(State {
                lease: None,
                renew_until: None,
                in_flight: 0,
                guard: Some(guard),
                reported: None,
            }),
            wake: Notify::new(),
            on_change,
        });
        let task = tokio::spawn(keep(shared.clone(), etcd, period).in_current_span());
        Ok(LeaseKeeper { shared, task })
    }

    /// The lease we hold, if any.
    pub fn held(&self) -> Option<Lease> {
        self.shared.lock().lease
    }

    /// We hold `lease_id`, renewed (or granted) at `renewed_at`: keep it
    /// alive until `renew_until`.
    pub fn hold(&self, lease_id: i64, renewed_at: Instant, renew_until: Instant) {
        {
            let mut s = self.shared.lock();
            s.lease = Some(Lease {
                lease_id,
                renewed_at,
            });
            s.renew_until = Some(renew_until);
            self.shared.feed(&mut s);
        }
        self.shared.wake.notify_one();
    }

    /// The loop still decides to lead under `lease_id`: renew until
    /// `until`. False when the keeper holds no such lease (an agent that
    /// restarted on its own key proves it with a renewal of its own first).
    pub fn extend(&self, lease_id: i64, until: Instant) -> bool {
        let extended = {
            let mut s = self.shared.lock();
            if s.lease.is_some_and(|l| l.lease_id == lease_id) {
                s.renew_until = Some(s.renew_until.map_or(until, |u| u.max(until)));
                true
            } else {
                false
            }
        };
        if extended {
            self.shared.wake.notify_one();
        }
        extended
    }

    /// Failsafe: every member confirmed us at `at`, which counts as a
    /// renewal sent then.
    pub fn confirmed(&self, at: Instant) {
        let mut s = self.shared.lock();
        if let Some(l) = s.lease.as_mut() {
            l.renewed_at = l.renewed_at.max(at);
            self.shared.feed(&mut s);
        }
    }

    /// Stops renewing and disarms the guard; returns the lease given up.
    pub fn release(&self) -> Option<Lease> {
        let mut s = self.shared.lock();
        s.renew_until = None;
        let lease = s.lease.take();
        self.shared.feed(&mut s);
        lease
    }

    /// Tells the fence guard the deadline as things stand (restarting a
    /// guard that died).
    pub fn feed_guard(&self) {
        let mut s = self.shared.lock();
        self.shared.feed(&mut s);
    }

    /// Stops the keeper and the guard (disarmed: Postgres is stopped).
    pub fn stop(&self) {
        self.task.abort();
        let mut s = self.shared.lock();
        s.renew_until = None;
        s.lease = None;
        s.guard = None;
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic under the lock leaves plain data behind: carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn feed(&self, s: &mut State) {
        if s.reported != s.lease {
            s.reported = s.lease;
            (self.on_change)(s.lease);
        }
        let msg = match s.lease {
            Some(l) => Message::Arm {
                within: (l.renewed_at + self.fence_window)
                    .saturating_duration_since(Instant::now()),
            },
            None => Message::Disarm,
        };
        let sent = s.guard.as_mut().map(|g| g.send(msg));
        if matches!(sent, Some(Ok(()))) {
            return;
        }
        error!(result = ?sent, "fence guard unavailable: restarting it");
        s.guard = None;
        match Guard::spawn(&self.data_dir) {
            Ok(mut g) => {
                let _ = g.send(msg);
                s.guard = Some(g);
            }
            Err(e) => error!(error = %e, "cannot restart the fence guard"),
        }
    }

    /// The lease to renew now, counted as in flight; None when renewals are
    /// off, past their window, or enough are outstanding.
    fn next_renewal(&self) -> Option<i64> {
        let mut s = self.lock();
        let lease = s.lease?;
        let wanted = s.renew_until.is_some_and(|u| Instant::now() < u);
        if !wanted || s.in_flight >= MAX_IN_FLIGHT {
            return None;
        }
        s.in_flight += 1;
        Some(lease.lease_id)
    }

    fn renewed(&self, lease_id: i64, sent_at: Instant, answer: Result<bool, String>) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        let Some(lease) = s.lease.filter(|l| l.lease_id == lease_id) else {
            return;
        };
        match answer {
            Ok(true) => {
                if sent_at > lease.renewed_at {
                    s.lease = Some(Lease {
                        lease_id,
                        renewed_at: sent_at,
                    });
                    self.feed(&mut s);
                }
            }
            Ok(false) => {
                warn!(lease_id, "leader lease expired");
                s.lease = None;
                s.renew_until = None;
                self.feed(&mut s);
            }
            Err(e) => {
                let since = lease.renewed_at.elapsed();
                warn!(lease_id, error = %e, since_renewal_ms = since.as_millis() as u64, "leader lease keepalive failed");
            }
        }
    }
}

/// The keeper task: a keepalive every `period` while renewals are wanted,
/// each on its own, answered or not.
async fn keep(shared: Arc<Shared>, etcd: Etcd, period: Duration) {
    loop {
        match shared.next_renewal() {
            Some(lease_id) => {
                let shared = shared.clone();
                let etcd = etcd.clone();
                let renewal = async move {
                    let sent_at = Instant::now();
                    let answer = etcd.keep_alive(lease_id).await.map_err(|e| e.to_string());
                    shared.renewed(lease_id, sent_at, answer);
                };
                tokio::spawn(renewal.in_current_span());
                tokio::time::sleep(period).await;
            }
            None => {
                // Woken by a new lease or a pushed-forward window, else
                // look again a period later (a window that ran out, a full
                // pipeline).
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep(period) => {}
                }
            }
        }
    }
}
