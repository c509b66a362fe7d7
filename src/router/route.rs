//! What the agent publishes for the router: the primary, the replicas fit for
//! reads, and until when the agent vouches for them (its lease / fence
//! window). The router only reads it; whether a backend may still be used is
//! decided here, from the route and the time, nowhere else.

use std::fmt;
use std::time::Instant;

/// One member's Postgres, as the router connects to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Member name (for logs and metrics).
    pub name: String,
    /// Host name or IP address (an IPv6 literal with or without brackets).
    pub host: String,
    pub port: u16,
}

impl Backend {
    pub fn new(name: impl Into<String>, host: impl Into<String>, port: u16) -> Backend {
        Backend {
            name: name.into(),
            host: host.into(),
            port,
        }
    }

    /// `host:port`, brackets around an IPv6 literal.
    pub fn address(&self) -> String {
        crate::net::host_port(&self.host, self.port)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.address())
    }
}

/// The route the agent publishes through a `watch` channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// The member whose Postgres takes writes.
    pub primary: Option<Backend>,
    /// Replicas fit for reads: running, within the lag limit, not tagged
    /// `noloadbalance` (filtered by the agent).
    pub replicas: Vec<Backend>,
    /// The route may be used until then (the lease / fence window as the
    /// agent sees it); `None` = no route. The router enforces it with its
    /// own timer, so a stuck agent cannot keep connections open past it.
    pub valid_until: Option<Instant>,
}

impl Route {
    /// No route: new connections are held, open ones closed.
    pub fn none() -> Route {
        Route::default()
    }

    /// Whether the route may be used at `now`.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| until > now)
    }

    /// The primary read-write connections may go to at `now`.
    pub fn primary_at(&self, now: Instant) -> Option<&Backend> {
        self.primary.as_ref().filter(|_| self.is_valid_at(now))
    }

    /// The replicas read-only connections may go to at `now`.
    pub fn replicas_at(&self, now: Instant) -> &[Backend] {
        if self.is_valid_at(now) {
            &self.replicas
        } else {
            &[]
        }
    }

    /// Why the routable primary went from `old` to this route's at `now`,
    /// for the log line of a route change.
    pub(super) fn change_reason(&self, old: Option<&Backend>, now: Instant) -> &'static str {
        match (old, self.primary_at(now)) {
            (_, Some(_)) if old.is_none() => "primary known",
            (_, Some(_)) => "primary changed",
            (Some(old), None)
                if self.primary.as_ref() == Some(old) && self.valid_until.is_some() =>
            {
                "route expired: valid_until passed without renewal"
            }
            _ => "no primary",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_route_is_usable_only_before_valid_until() {
        let now = Instant::now();
        let n1 = Backend::new("n1", "fdaa::1", 5433);
        assert_eq!(n1.address(), "[fdaa::1]:5433");
        assert_eq!(n1.to_string(), "n1 ([fdaa::1]:5433)");
        let route = Route {
            primary: Some(n1.clone()),
            replicas: vec![Backend::new("n2", "10.0.0.2", 5433)],
            valid_until: Some(now + Duration::from_secs(1)),
        };
        assert_eq!(route.primary_at(now), Some(&n1));
        assert_eq!(route.replicas_at(now).len(), 1);
        let later = now + Duration::from_secs(1);
        assert_eq!(route.primary_at(later), None, "valid_until is exclusive");
        assert!(route.replicas_at(later).is_empty());
        let unbounded = Route {
            valid_until: None,
            ..route.clone()
        };
        assert_eq!(unbounded.primary_at(now), None, "None means no route");
        assert_eq!(Route::none().primary_at(now), None);

        assert_eq!(route.change_reason(None, now), "primary known");
        let n3 = Backend::new("n3", "h", 1);
        assert_eq!(route.change_reason(Some(&n3), now), "primary changed");
        assert!(route
            .change_reason(Some(&n1), later)
            .starts_with("route expired"));
        assert_eq!(unbounded.change_reason(Some(&n1), now), "no primary");
        assert_eq!(Route::none().change_reason(Some(&n1), now), "no primary");
    }
}
