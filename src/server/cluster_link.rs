//! A server's link to its cluster ([`ServerConfig::cluster`](super::ServerConfig::cluster)):
//! the instance id, the bus started when the server runs, and the side of the bus that hands
//! what other instances sent to this server's loops.
//!
//! Without a cluster (or without the `cluster` feature) every call here is a no-op. With one,
//! nothing here waits for Redis: the loops deliver locally first, and the bus only queues.

#[cfg(feature = "cluster")]
use std::sync::{Arc, OnceLock, Weak};

#[cfg(feature = "cluster")]
use super::cluster::{Bus, ClusterStats, Inbound, Target};
use super::ConnId;
use crate::proto::frame::OpCode;

/// What a server knows of its cluster; one per server, shared by its loops and handles.
#[derive(Default)]
pub(crate) struct ClusterLink {
    /// Set once, when the server starts running with a cluster configured.
    #[cfg(feature = "cluster")]
    bus: OnceLock<Arc<Bus>>,
}

impl ClusterLink {
    /// Picks this run's instance id and starts the bus, when `cfg` has a cluster.
    #[cfg(not(feature = "cluster"))]
    pub(crate) fn start(
        &self,
        cfg: &super::ServerConfig,
        group: &std::sync::Arc<super::handle::Group>,
    ) -> std::io::Result<()> {
        let _ = (cfg, group);
        Ok(())
    }

    /// Picks this run's instance id and starts the bus, when `cfg` has a cluster.
    #[cfg(feature = "cluster")]
    pub(crate) fn start(&self, cfg: &super::ServerConfig, group: &Arc<super::handle::Group>) -> std::io::Result<()> {
        let Some(cluster) = &cfg.cluster else { return Ok(()) };
        let instance = instance_id()?;
        let inbound = Arc::new(Delivery {
            group: Arc::downgrade(group),
            instance,
        });
        let bus = Bus::start(cluster, instance, cfg.max_message, Arc::clone(&group.budget), inbound)?;
        log::info!("cluster: instance {instance:016x} on {}", cluster.url);
        if let Err(bus) = self.bus.set(bus) {
            // A server runs once; a second start would be a bug, and its bus must not linger.
            bus.stop();
        }
        Ok(())
    }

    /// Stops the bus (a leave notice to the other instances, if Redis is reachable).
    pub(crate) fn stop(&self) {
        #[cfg(feature = "cluster")]
        if let Some(bus) = self.bus.get() {
            bus.stop();
        }
    }

    /// This server's instance id: random and non-zero with a cluster, 0 without.
    #[inline]
    pub(crate) fn instance(&self) -> u64 {
        #[cfg(feature = "cluster")]
        if let Some(bus) = self.bus.get() {
            return bus.instance();
        }
        0
    }

    /// Whether a bus runs (ids of other instances can be reached).
    #[inline]
    pub(crate) fn is_on(&self) -> bool {
        #[cfg(feature = "cluster")]
        return self.bus.get().is_some();
        #[cfg(not(feature = "cluster"))]
        false
    }

    /// Hands a broadcast to the other instances; false if it was not queued (no cluster, or
    /// the bus dropped it and counted it).
    #[inline]
    pub(crate) fn broadcast(&self, op: OpCode, payload: &[u8], except: Option<ConnId>) -> bool {
        #[cfg(feature = "cluster")]
        if let Some(bus) = self.bus.get() {
            return bus.send(Target::All, op, payload, except.map(ConnId::as_u128));
        }
        let _ = (op, payload, except);
        false
    }

    /// Hands a publish to `topic` to the other instances.
    #[inline]
    pub(crate) fn publish(&self, topic: &str, op: OpCode, payload: &[u8], except: Option<ConnId>) -> bool {
        #[cfg(feature = "cluster")]
        if let Some(bus) = self.bus.get() {
            return bus.send(Target::Topic(topic), op, payload, except.map(ConnId::as_u128));
        }
        let _ = (topic, op, payload, except);
        false
    }

    /// Hands a message for connection `id` to the instance that owns it.
    pub(crate) fn send_to(&self, id: ConnId, op: OpCode, payload: &[u8]) -> bool {
        #[cfg(feature = "cluster")]
        if let Some(bus) = self.bus.get() {
            return bus.send(Target::Conn(id.as_u128()), op, payload, None);
        }
        let _ = (id, op, payload);
        false
    }

    /// A topic got its first subscriber on one of the loops.
    pub(crate) fn topic_joined(&self, topic: &str) {
        #[cfg(feature = "cluster")]
        if let Some(bus) = self.bus.get() {
            bus.topic_joined(topic);
        }
        let _ = topic;
    }

    /// A topic lost its last subscriber on one of the loops.
    pub(crate) fn topic_left(&self, topic: &str) {
        #[cfg(feature = "cluster")]
        if let Some(bus) = self.bus.get() {
            bus.topic_left(topic);
        }
        let _ = topic;
    }

    /// Open connections on the other live instances.
    pub(crate) fn remote_open(&self) -> usize {
        #[cfg(feature = "cluster")]
        if let Some(bus) = self.bus.get() {
            return bus.remote_open();
        }
        0
    }

    /// The bus's counters, when a bus runs.
    #[cfg(feature = "cluster")]
    pub(crate) fn stats(&self) -> Option<ClusterStats> {
        self.bus.get().map(|b| b.stats())
    }
}

/// A random non-zero instance id from the OS's source.
#[cfg(feature = "cluster")]
fn instance_id() -> std::io::Result<u64> {
    loop {
        let id = getrandom::u64().map_err(|e| std::io::Error::other(format!("no random instance id: {e}")))?;
        if id != 0 {
            return Ok(id);
        }
    }
}

/// What the bus delivers, handed to the loops' inboxes. It holds the server weakly: the bus
/// outlives neither the server nor its handles' reach.
#[cfg(feature = "cluster")]
struct Delivery {
    group: Weak<super::handle::Group>,
    instance: u64,
}

#[cfg(feature = "cluster")]
impl Inbound for Delivery {
    fn deliver(&self, target: Target<'_>, op: OpCode, payload: &[u8], except: Option<u128>) -> usize {
        let Some(group) = self.group.upgrade() else { return 0 };
        let handle = super::Handle { group };
        let except = except.map(ConnId::from_u128);
        match target {
            Target::All => handle.deliver_remote(payload, op, None, except),
            Target::Topic(t) => handle.deliver_remote(payload, op, Some(t), except),
            Target::Conn(id) => {
                let id = ConnId::from_u128(id);
                if id.instance() != self.instance {
                    return 0;
                }
                handle.send_remote(id, payload, op)
            }
        }
    }

    fn local_open(&self) -> usize {
        self.group
            .upgrade()
            .map_or(0, |g| g.open.load(std::sync::atomic::Ordering::Relaxed))
    }
}

#[cfg(feature = "cluster")]
impl super::Handle {
    /// Hands a message from another instance to every loop (the frame encoded once, shared by
    /// their queues); returns how many loops missed it, [`MAX_LOOP_COMMANDS`] behind.
    ///
    /// [`MAX_LOOP_COMMANDS`]: super::handle::MAX_LOOP_COMMANDS
    fn deliver_remote(&self, payload: &[u8], op: OpCode, topic: Option<&str>, except: Option<ConnId>) -> usize {
        let frame = self.frame(payload, op);
        let topic: Option<Arc<str>> = topic.map(Arc::from);
        (0..self.group.inboxes.len())
            .filter(|&lp| {
                let c = super::handle::Command::Frame {
                    frame: Arc::clone(&frame),
                    topic: topic.clone(),
                    except,
                };
                self.push(lp, c, Some(super::handle::MAX_LOOP_COMMANDS)) == Err(super::HandleError::Busy)
            })
            .count()
    }

    /// Hands a message from another instance to the loop that owns connection `id`; returns 1
    /// if that loop was too far behind to take it.
    fn send_remote(&self, id: ConnId, payload: &[u8], op: OpCode) -> usize {
        if id.loop_index() >= self.group.inboxes.len() {
            return 0;
        }
        let c = super::handle::Command::Send(id, payload.to_vec(), op);
        usize::from(
            self.push(id.loop_index(), c, Some(super::handle::MAX_LOOP_COMMANDS)) == Err(super::HandleError::Busy),
        )
    }
}
