//! A stand-in for `tc qdisc add dev eth0 root netem delay D loss P` on
//! kernels built without sch_netem: iptables sends a node's outgoing packets
//! to an NFQUEUE, and this loop gives each one its verdict D after it arrived
//! (ACCEPT), or drops it with probability P. A dropped verdict is lost on the
//! wire as far as the sender knows (an iptables DROP in OUTPUT would instead
//! fail the sender's write with EPERM, which TCP treats differently).
//!
//! It runs on a thread of this process moved into the node's network
//! namespace (`setns`), so neither the image nor the container needs
//! anything. The rules use `--queue-bypass`: when nothing listens on the
//! queue any more, packets pass undelayed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use nfq::{Queue, Verdict};

/// What one netem run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetemStats {
    pub delayed: u64,
    pub dropped: u64,
    /// The most packets held at once.
    pub max_held: usize,
}

/// The fault: a constant delay (so verdicts stay in arrival order) and a
/// loss probability.
#[derive(Debug, Clone, Copy)]
pub struct Netem {
    pub queue: u16,
    pub delay: Duration,
    pub loss: f64,
    pub seed: u64,
}

/// xorshift64*: enough randomness to pick which packets are lost, and a
/// seed to print.
struct Coin(u64);

impl Coin {
    fn new(seed: u64) -> Coin {
        Coin(seed.max(1))
    }
    fn below(&mut self, p: f64) -> bool {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        (x as f64 / (1u64 << 53) as f64) < p
    }
}

/// A seed from the clock, for runs that do not choose one.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

impl Netem {
    /// Serves the queue in the calling thread's network namespace until
    /// `stop` is set; then accepts what it still holds and unbinds.
    pub fn serve(&self, stop: &AtomicBool) -> Result<NetemStats> {
        let mut queue = Queue::open().context("opening a netfilter queue socket")?;
        queue
            .bind(self.queue)
            .with_context(|| format!("binding NFQUEUE {}", self.queue))?;
        // Metadata only: the verdict never changes a packet.
        queue.set_copy_range(self.queue, 0)?;
        // Large segments stay whole instead of being split for us.
        queue.set_recv_gso(self.queue, true)?;
        queue.set_queue_max_len(self.queue, 1 << 16)?;
        queue.set_nonblocking(true);
        let mut coin = Coin::new(self.seed);
        let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
        let mut stats = NetemStats::default();
        let result = loop {
            if stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            let mut failed = None;
            loop {
                match queue.recv() {
                    Ok(mut msg) => {
                        if coin.below(self.loss) {
                            msg.set_verdict(Verdict::Drop);
                            stats.dropped += 1;
                            if let Err(e) = queue.verdict(msg) {
                                failed = Some(e);
                                break;
                            }
                        } else {
                            held.push_back((Instant::now() + self.delay, msg));
                            stats.max_held = stats.max_held.max(held.len());
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                break Err(anyhow!(e).context("reading the netfilter queue"));
            }
            let now = Instant::now();
            while held.front().is_some_and(|(due, _)| *due <= now) {
                let (_, mut msg) = held.pop_front().unwrap();
                msg.set_verdict(Verdict::Accept);
                stats.delayed += 1;
                queue.verdict(msg).context("accepting a delayed packet")?;
            }
            // New packets are picked up within a millisecond; their delay
            // runs from then.
            let next = held.front().map_or(Duration::from_millis(1), |(due, _)| {
                due.saturating_duration_since(now)
            });
            std::thread::sleep(next.min(Duration::from_millis(1)));
        };
        // Unbinding drops what the kernel still queues for us: let it pass.
        for (_, mut msg) in held.drain(..) {
            msg.set_verdict(Verdict::Accept);
            let _ = queue.verdict(msg);
        }
        let _ = queue.unbind(self.queue);
        result.map(|()| stats)
    }
}

/// Moves the calling thread into the network namespace of process `pid`.
pub fn enter_netns(pid: u32) -> Result<()> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("network namespace of PID {pid}"))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into the network namespace of PID {pid}"))
}

/// Runs `f` on a new thread inside the network namespace of `pid` (this
/// process' other threads stay where they are).
pub fn in_netns<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    std::thread::spawn(move || -> Result<T> {
        enter_netns(pid)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("thread in the network namespace of PID {pid} panicked"))?
}

/// A netem loop running in a node's network namespace; stopped (and its
/// held packets let through) on `stop` or drop.
pub struct NetemThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<NetemStats>>>,
}

impl NetemThread {
    /// Starts serving `netem.queue` in the namespace of `pid`; returns once
    /// the queue is bound (or failed to bind).
    pub fn start(pid: u32, netem: Netem) -> Result<NetemThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            if let Err(e) = enter_netns(pid) {
                let _ = ready_tx.send(Err(format!("{e:#}")));
                return Err(e);
            }
            let _ = ready_tx.send(Ok(()));
            netem.serve(&flag)
        });
        let mut thread = NetemThread {
            stop,
            handle: Some(handle),
        };
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(anyhow!(e)),
            Err(_) => return Err(anyhow!("the netem thread did not start")),
        }
        // A bind error ends the thread at once; give it a moment to show.
        std::thread::sleep(Duration::from_millis(100));
        if thread.handle.as_ref().is_some_and(|h| h.is_finished()) {
            return Err(thread
                .stop_now()
                .err()
                .unwrap_or_else(|| anyhow!("the netem loop ended before the fault began")));
        }
        Ok(thread)
    }

    /// Stops the loop and returns what it did.
    pub fn stop_now(&mut self) -> Result<NetemStats> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow!("the netem thread panicked"))?,
            None => Err(anyhow!("the netem loop was already stopped")),
        }
    }
}

impl Drop for NetemThread {
    fn drop(&mut self) {
        if self.handle.is_some() {
            let _ = self.stop_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Coin;

    #[test]
    fn coin_lands_near_its_probability() {
        let mut coin = Coin::new(42);
        let hits = (0..100_000).filter(|_| coin.below(0.1)).count();
        assert!((9_000..11_000).contains(&hits), "{hits}");
        let mut never = Coin::new(7);
        assert!(!(0..1000).any(|_| never.below(0.0)));
    }
}
