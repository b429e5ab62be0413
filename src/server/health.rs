//! The server's built-in routes, answered before the handler sees a request: `GET /health`
//! (always), `GET /metrics` (with [`ServerConfig::metrics`](super::ServerConfig::metrics)),
//! and the metrics listener that serves only those two
//! ([`ServerConfig::metrics_listen`](super::ServerConfig::metrics_listen)); and the loop's side
//! of the metrics: its view of itself, published every
//! [`PUBLISH_EVERY`](super::metrics::PUBLISH_EVERY).

use std::io;
use std::sync::atomic::Ordering;

use super::handler::ServerEngine;
use super::metrics::{self, LoopView, ProcessView, PUBLISH_TIMER};
use super::serve::Srv;
use super::Handler;
use crate::io::transport::SlotStream;
use crate::proto::{Answer, Request};

/// What `/health` says of the cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
enum Cluster {
    Off,
    Up,
    Down,
}

impl<H: Handler> Srv<H> {
    /// The answer to a built-in route, if `req` asks for one (on the metrics listener every
    /// request gets one).
    pub(super) fn builtin_route(&self, eng: &ServerEngine<H::State>, key: usize, req: &Request) -> Option<Answer> {
        if !self.is_admin(eng, key) {
            return None;
        }
        // The metrics listener serves nothing else, upgrades included.
        Some(self.own_route(eng, req, true).unwrap_or_else(|| {
            if matches!(req.method(), "GET" | "HEAD") {
                Answer::reject(404, "not found: this listener serves /metrics and /health")
            } else {
                Answer::reject(405, "only GET is served here").with_header("Allow", "GET, HEAD")
            }
        }))
    }

    /// `/health`, and `/metrics` where metrics are served: on the main listener these come after
    /// the handler's own routes, so an application may answer the same paths itself.
    pub(super) fn own_route(&self, eng: &ServerEngine<H::State>, req: &Request, admin: bool) -> Option<Answer> {
        if !matches!(req.method(), "GET" | "HEAD") {
            return None;
        }
        match req.path_only() {
            "/health" => Some(self.health(eng)),
            "/metrics" if admin || self.cfg.metrics => Some(self.metrics_page(eng)),
            _ => None,
        }
    }

    /// Whether connection `key` came through the metrics listener: its local address is the
    /// listener's (asked of the socket only with a metrics listener, once per request; a flag
    /// in the slot would grow every idle connection).
    fn is_admin(&self, eng: &ServerEngine<H::State>, key: usize) -> bool {
        let Some(admin) = self.admin.as_ref().and_then(|l| l.local_addr().ok()) else {
            return false;
        };
        let Ok(local) = eng.slots[key].stream.tcp().local_addr() else {
            return false;
        };
        local.port() == admin.port() && (admin.ip().is_unspecified() || local.ip() == admin.ip())
    }

    /// `200` and a small JSON body, or `503` while draining or while a configured cluster is
    /// not connected.
    fn health(&self, eng: &ServerEngine<H::State>) -> Answer {
        let board = &self.group().board;
        let draining = board.draining.load(Ordering::Relaxed);
        let cluster = self.cluster_state();
        let status = if draining {
            "draining"
        } else if cluster == Cluster::Down {
            "cluster down"
        } else {
            "ok"
        };
        let body = format!(
            "{{\"status\":\"{status}\",\"connections\":{},\"uptime_s\":{},\"memory\":{},\"memory_limit\":{},\"cluster\":\"{}\"}}\n",
            board.connections(self.loop_state.open_everywhere()),
            board.started.elapsed().as_secs(),
            eng.budget.used(),
            eng.budget.limit(),
            match cluster {
                Cluster::Off => "off",
                Cluster::Up => "up",
                Cluster::Down => "down",
            }
        );
        Answer::respond(
            if status == "ok" { 200 } else { 503 },
            "application/json",
            body.into_bytes(),
        )
    }

    fn cluster_state(&self) -> Cluster {
        #[cfg(feature = "cluster")]
        if let Some(c) = self.group().link.stats() {
            return match c.state {
                super::ClusterState::Up => Cluster::Up,
                _ => Cluster::Down,
            };
        }
        Cluster::Off
    }

    /// `GET /metrics`: every metric of the server, this loop's fresh.
    fn metrics_page(&self, eng: &ServerEngine<H::State>) -> Answer {
        let lp = usize::from(self.loop_state.lp);
        let text = self
            .group()
            .board
            .render(lp, &self.loop_view(eng), &self.process_view(eng));
        Answer::respond(200, metrics::CONTENT_TYPE, text.into_bytes())
    }

    fn loop_view(&self, eng: &ServerEngine<H::State>) -> LoopView {
        #[cfg(feature = "tls")]
        let tls = eng.streams.counts();
        #[cfg(not(feature = "tls"))]
        let tls = (0, 0);
        let c = eng.codec.stats();
        let deflate = [c.inflated_in, c.inflated_out, c.compressed_in, c.compressed_out];
        LoopView {
            stats: self.loop_state.stats,
            counters: self.loop_state.counters,
            bytes: (eng.bytes_in, eng.bytes_out),
            queued: eng.slots.iter().map(|(_, s)| s.unsent() as u64).sum(),
            tls,
            deflate,
        }
    }

    fn process_view(&self, eng: &ServerEngine<H::State>) -> ProcessView {
        #[cfg(feature = "cluster")]
        let cluster = self.group().link.stats().map(|c| {
            (
                c.state == super::ClusterState::Up,
                [c.dropped_out, c.dropped_in, c.lost],
            )
        });
        #[cfg(not(feature = "cluster"))]
        let cluster = None;
        ProcessView {
            memory: eng.budget.used(),
            memory_limit: eng.budget.limit(),
            cluster,
        }
    }

    /// Whether the loop publishes its counters (metrics on somewhere, or worker processes
    /// that read one another's).
    pub(super) fn publishes(&self) -> bool {
        self.cfg.metrics || self.cfg.metrics_listen.is_some() || self.cfg.metrics_board.is_some()
    }

    /// Publishes this loop's counters and sets the timer for the next time.
    pub(super) fn publish(&mut self, eng: &mut ServerEngine<H::State>) {
        let lp = usize::from(self.loop_state.lp);
        let (view, process) = (self.loop_view(eng), self.process_view(eng));
        self.group().board.publish(lp, &view, &process);
        let every = metrics::PUBLISH_EVERY.as_millis() as u64;
        eng.set_timer_at(eng.now + every, PUBLISH_TIMER);
    }

    /// Accepts on the metrics listener: plain HTTP, counted like any connection.
    pub(super) fn accept_admin(&mut self, eng: &mut ServerEngine<H::State>) {
        loop {
            let Some(listener) = &self.admin else { return };
            match listener.accept() {
                Ok((stream, addr)) => self.add_connection(eng, stream, addr, true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::debug!("metrics listener: accept failed: {e}");
                    }
                    return;
                }
            }
        }
    }
}
