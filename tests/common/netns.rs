//! A private network for one test: network namespaces joined by a bridge
//! (in a namespace of its own, so nothing is added to the host's network),
//! each with its own /etc/hosts (`ip netns exec` bind-mounts
//! /etc/netns/NS/hosts over /etc/hosts for the commands it runs). Needs root
//! and iproute2. Everything is removed on drop, also when the test panics.

use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lab's IPv6 prefix (ULA); every namespace is private, so two labs
/// may use the same one.
const PREFIX: &str = "fdaa:0:77";
/// A MAC address no interface has: frames to it go nowhere, without an answer.
const NOWHERE_MAC: &str = "02:00:5e:00:00:99";

/// One machine of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    pub ipv6: Ipv6Addr,
    /// Only for hosts added with IPv4.
    pub ipv4: Option<Ipv4Addr>,
}

pub struct NetLab {
    /// Unique per run: prefix of every namespace name.
    id: String,
    hub: String,
    hosts: Vec<Host>,
    namespaces: Vec<String>,
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (is iproute2 installed?)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl NetLab {
    /// A bridge in a namespace of its own; hosts are added with
    /// [`NetLab::add_host`].
    pub fn new() -> NetLab {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "pgha6-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        assert!(
            nix::unistd::geteuid().is_root(),
            "network namespaces need root: run this test as root (CI does)"
        );
        let hub = format!("{id}-hub");
        let mut lab = NetLab {
            id,
            hub: hub.clone(),
            hosts: Vec::new(),
            namespaces: Vec::new(),
        };
        ip(&["netns", "add", &hub]);
        lab.namespaces.push(hub.clone());
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        // Without a multicast querier, snooping may stop neighbour discovery.
        ip(&[
            "-n",
            &hub,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        lab
    }

    /// A namespace with `eth0` on the bridge and an IPv6 address; with
    /// `ipv4` also an IPv4 address, else no IPv4 at all (not even
    /// 127.0.0.1). Its /etc/hosts is empty until [`NetLab::write_hosts`].
    pub fn add_host(&mut self, name: &str, ipv4: bool) -> Host {
        let index = self.hosts.len() + 2;
        let ns = format!("{}-{name}", self.id);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let port = format!("p{index}");
        ip(&[
            "-n", &self.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]);
        ip(&["-n", &self.hub, "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        if !ipv4 {
            ip(&["-n", &ns, "addr", "del", "127.0.0.1/8", "dev", "lo"]);
        }
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        let ipv6: Ipv6Addr = format!("{PREFIX}::{index:x}").parse().unwrap();
        // nodad: usable at once, not after duplicate address detection.
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ipv6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let ipv4 = ipv4.then(|| Ipv4Addr::new(10, 77, 0, index as u8));
        if let Some(v4) = ipv4 {
            ip(&["-n", &ns, "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        }
        fs::create_dir_all(self.etc_dir(&ns)).expect("create /etc/netns/NS");
        let host = Host {
            name: name.to_string(),
            ns,
            ipv6,
            ipv4,
        };
        self.hosts.push(host.clone());
        host
    }

    /// An IPv6 address of the lab's prefix that `host` sends packets to and
    /// never hears back from (no reset, no ICMP): a black hole.
    pub fn black_hole(&self, host: &Host) -> Ipv6Addr {
        let addr: Ipv6Addr = format!("{PREFIX}::ff").parse().unwrap();
        ip(&[
            "-n",
            &host.ns,
            "-6",
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            NOWHERE_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        addr
    }

    /// Writes `text` as /etc/hosts of the commands [`NetLab::command`] runs
    /// on `host`.
    pub fn write_hosts(&self, host: &Host, text: &str) {
        fs::write(self.etc_dir(&host.ns).join("hosts"), text).expect("write /etc/netns/NS/hosts");
    }

    /// `/etc/hosts` text naming every host `NAME.internal` with its IPv6
    /// address only (no A records), plus `localhost` as `::1`.
    pub fn aaaa_only_hosts(&self) -> String {
        let mut text = String::from("::1 localhost\n");
        for h in &self.hosts {
            text.push_str(&format!("{} {}.internal\n", h.ipv6, h.name));
        }
        text
    }

    /// `program` run inside `host`'s namespace (and with its /etc/hosts).
    pub fn command(&self, host: &Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.ns]).arg(program);
        cmd
    }

    fn etc_dir(&self, ns: &str) -> PathBuf {
        PathBuf::from("/etc/netns").join(ns)
    }
}

impl Drop for NetLab {
    /// Processes started in the namespaces must be stopped first (they keep
    /// a namespace alive after its name is gone).
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = fs::remove_dir_all(self.etc_dir(ns));
        }
    }
}
