//! The cross-thread [`Handle`]: the commands it queues for a server's loops, and the loops'
//! inboxes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mio::Waker;

use super::{ipcount, ConnId};
use crate::io::budget::{Budget, SharedFrame};
use crate::proto::frame::{write_frame, OpCode};
use crate::proto::Message;

/// A command for one loop, from a [`Handle`] or from another loop of the same server.
pub(super) enum Command {
    /// A frame encoded once, for every open connection (or the subscribers of `topic`) but
    /// `except`.
    Frame {
        frame: Arc<SharedFrame>,
        topic: Option<Arc<str>>,
        except: Option<ConnId>,
    },
    Send(ConnId, Vec<u8>, OpCode),
    Shutdown,
    /// Stop at once (a second signal).
    Stop,
    Wake,
}

/// The message a command carries (text that is not UTF-8 cannot be sent).
pub(super) fn message(bytes: &[u8], op: OpCode) -> Option<Message<'_>> {
    match op {
        OpCode::Text => std::str::from_utf8(bytes).ok().map(Message::Text),
        _ => Some(Message::Binary(bytes)),
    }
}

/// Commands from handles waiting for a loop; more are refused so that a producer faster than
/// the loop cannot grow memory without bound.
const MAX_COMMANDS: usize = 1024;

/// Broadcasts and publishes from other loops waiting for a loop; past this a loop misses them
/// (counted as dropped): it has fallen far behind the others.
pub(super) const MAX_LOOP_COMMANDS: usize = 16 * 1024;

/// Why a [`Handle`] call did not reach the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandleError {
    /// 1,024 commands are already waiting (on one of the loops); try again once it has caught
    /// up. Nothing was queued.
    Busy,
    /// The server has stopped, or was dropped without running: nothing will read the command.
    Stopped,
    /// A message for a connection of another instance of the cluster could not be queued for
    /// Redis (Redis unreachable, or the queue to it full); it was dropped and counted.
    Unreachable,
    /// [`Handle::reload_tls`] on a server that does not speak TLS: a running server cannot turn
    /// TLS on.
    NotTls,
}

impl std::fmt::Display for HandleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HandleError::Busy => "the server has not caught up with earlier commands",
            HandleError::Stopped => "the server has stopped",
            HandleError::Unreachable => "the cluster cannot take the message now (Redis down or behind)",
            HandleError::NotTls => "the server does not speak TLS",
        })
    }
}

impl std::error::Error for HandleError {}

/// One loop's inbox: commands from handles and from the other loops.
pub(super) struct Inbox {
    pub(super) waker: Waker,
    pub(super) queue: Mutex<VecDeque<Command>>,
    pub(super) stopped: AtomicBool,
}

/// What the loops of one server share. Touched when a connection comes or goes and when a
/// command crosses loops, never for a message that stays within its loop.
pub(super) struct Group {
    pub(super) inboxes: Box<[Inbox]>,
    /// The memory budget, shared by every loop.
    pub(super) budget: Arc<Budget>,
    /// Slots in use on every loop, for `max_connections`.
    pub(super) slots: AtomicUsize,
    /// Open WebSocket connections on every loop.
    pub(super) open: AtomicUsize,
    /// Open connections per peer IP, kept only with a per-IP limit.
    pub(super) per_ip: Mutex<ipcount::IpCounts>,
    /// The cluster, once the server runs with one.
    pub(super) link: super::cluster_link::ClusterLink,
    /// The loops' published metrics, the start time and the draining flag.
    pub(super) board: super::metrics::Board,
    /// The TLS settings new handshakes take, when the server speaks TLS.
    #[cfg(feature = "tls")]
    pub(super) tls: Option<super::tls_reload::CurrentTls>,
}

/// Lets other threads reach a running server: send to one connection, publish to a topic,
/// broadcast, wake the handler, or stop it. With several loops
/// ([`ServerConfig::threads`](super::ServerConfig::threads)), a send goes to the loop that
/// owns the connection, and a broadcast, publish, wake or shutdown to every loop (a message is
/// encoded once, here). With a cluster ([`ServerConfig::cluster`](super::ServerConfig::cluster))
/// a broadcast or publish also goes to the other instances once every loop here has it, and a
/// send to a connection of another instance goes there; neither waits for Redis.
///
/// At most 1,024 commands wait at once per loop; past that the calls return
/// [`HandleError::Busy`] until the loop catches up. Once the server has stopped they return
/// [`HandleError::Stopped`].
#[derive(Clone)]
pub struct Handle {
    pub(super) group: Arc<Group>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("loops", &self.group.inboxes.len())
            .field("stopped", &self.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Handle {
    /// Queues `c` for loop `lp` if fewer than `bound` commands wait there (`None`: any number),
    /// and wakes the loop if its queue was empty (a loop takes its whole queue on each wake).
    pub(super) fn push(&self, lp: usize, c: Command, bound: Option<usize>) -> Result<(), HandleError> {
        let inbox = &self.group.inboxes[lp];
        let first = {
            let mut q = inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
            if inbox.stopped.load(Ordering::Acquire) {
                return Err(HandleError::Stopped);
            }
            if bound.is_some_and(|b| q.len() >= b) {
                return Err(HandleError::Busy);
            }
            q.push_back(c);
            q.len() == 1
        };
        if first {
            inbox.waker.wake().map_err(|_| HandleError::Stopped)?;
        }
        Ok(())
    }

    /// Queues a command for every running loop, or for none when one of them is full.
    fn push_all(&self, c: impl Fn() -> Command) -> Result<(), HandleError> {
        let inboxes = &self.group.inboxes;
        // Every queue locked, in loop order (a loop holds only its own lock, never waiting for
        // another while it does), so that the command reaches all loops or none.
        let mut queues: Vec<_> = inboxes
            .iter()
            .map(|i| i.queue.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let live = |lp: usize| !inboxes[lp].stopped.load(Ordering::Acquire);
        if !(0..inboxes.len()).any(live) {
            return Err(HandleError::Stopped);
        }
        if (0..inboxes.len()).any(|lp| live(lp) && queues[lp].len() >= MAX_COMMANDS) {
            return Err(HandleError::Busy);
        }
        let mut wake = Vec::new();
        for (lp, q) in queues.iter_mut().enumerate().filter(|(lp, _)| live(*lp)) {
            q.push_back(c());
            if q.len() == 1 {
                wake.push(lp);
            }
        }
        drop(queues);
        for lp in wake {
            let _ = inboxes[lp].waker.wake();
        }
        Ok(())
    }

    /// A message encoded once as a frame, shared by every loop's queues.
    pub(super) fn frame(&self, data: &[u8], op: OpCode) -> Arc<SharedFrame> {
        let mut frame = Vec::with_capacity(data.len() + 10);
        write_frame(&mut frame, true, op, None, data);
        SharedFrame::new(frame, &self.group.budget)
    }

    /// Hands a frame broadcast or published on loop `from` to the other loops; returns how many
    /// loops missed it because they had fallen [`MAX_LOOP_COMMANDS`] behind.
    pub(super) fn forward(
        &self,
        from: usize,
        frame: &Arc<SharedFrame>,
        topic: Option<&str>,
        except: Option<ConnId>,
    ) -> usize {
        let loops = self.group.inboxes.len();
        if loops == 1 {
            return 0;
        }
        let topic: Option<Arc<str>> = topic.map(Arc::from);
        (0..loops)
            .filter(|&lp| lp != from)
            .filter(|&lp| {
                let c = Command::Frame {
                    frame: Arc::clone(frame),
                    topic: topic.clone(),
                    except,
                };
                self.push(lp, c, Some(MAX_LOOP_COMMANDS)) == Err(HandleError::Busy)
            })
            .count()
    }

    /// Tells every other loop to begin a graceful shutdown (`now`: to stop at once).
    pub(super) fn stop_others(&self, from: usize, now: bool) {
        for lp in (0..self.group.inboxes.len()).filter(|&lp| lp != from) {
            let c = if now { Command::Stop } else { Command::Shutdown };
            let _ = self.push(lp, c, None);
        }
    }

    /// Marks loop `lp` stopped and drops what waits for it.
    pub(super) fn mark_stopped(&self, lp: usize) {
        let inbox = &self.group.inboxes[lp];
        let mut q = inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
        inbox.stopped.store(true, Ordering::Release);
        q.clear();
    }

    /// Whether the server has stopped (every loop has).
    pub fn is_stopped(&self) -> bool {
        self.group.inboxes.iter().all(|i| i.stopped.load(Ordering::Acquire))
    }

    /// Sends a message to the connection `id` on the loop that owns it. An id that no longer
    /// names an open connection, or never named one of this server's, is ignored there. With
    /// a cluster, the id of a connection of another instance goes there through Redis.
    fn send(&self, id: ConnId, data: &[u8], op: OpCode) -> Result<(), HandleError> {
        let link = &self.group.link;
        if id.instance() != link.instance() {
            if !link.is_on() || id.instance() == 0 {
                return Ok(()); // not an id a cluster can reach: never one of this server's
            }
            if self.is_stopped() {
                return Err(HandleError::Stopped);
            }
            return match link.send_to(id, op, data) {
                true => Ok(()),
                false => Err(HandleError::Unreachable),
            };
        }
        if id.loop_index() >= self.group.inboxes.len() {
            return Ok(());
        }
        self.push(
            id.loop_index(),
            Command::Send(id, data.to_vec(), op),
            Some(MAX_COMMANDS),
        )
    }

    /// Sends a text message to one connection. With a cluster, a connection of another
    /// instance is reached through Redis ([`HandleError::Unreachable`] when the message could
    /// not be queued for it).
    pub fn send_text(&self, id: ConnId, text: &str) -> Result<(), HandleError> {
        self.send(id, text.as_bytes(), OpCode::Text)
    }

    /// Sends a binary message to one connection.
    pub fn send_binary(&self, id: ConnId, data: &[u8]) -> Result<(), HandleError> {
        self.send(id, data, OpCode::Binary)
    }

    fn broadcast(&self, data: &[u8], op: OpCode, topic: Option<&str>) -> Result<(), HandleError> {
        let frame = self.frame(data, op);
        let shared_topic: Option<Arc<str>> = topic.map(Arc::from);
        self.push_all(|| Command::Frame {
            frame: Arc::clone(&frame),
            topic: shared_topic.clone(),
            except: None,
        })?;
        // Only once the loops have it: a call refused as busy is tried again, and the other
        // instances must not get it twice.
        match topic {
            None => self.group.link.broadcast(op, data, None),
            Some(t) => self.group.link.publish(t, op, data, None),
        };
        Ok(())
    }

    /// This server's instance id: random and non-zero once it runs with a cluster
    /// ([`ServerConfig::cluster`](super::ServerConfig::cluster)), 0 without.
    pub fn instance(&self) -> u64 {
        self.group.link.instance()
    }

    /// The cluster's counters, once the server runs with one.
    #[cfg(feature = "cluster")]
    pub fn cluster_stats(&self) -> Option<super::ClusterStats> {
        self.group.link.stats()
    }

    /// Sends a text message to every open connection.
    pub fn broadcast_text(&self, text: &str) -> Result<(), HandleError> {
        self.broadcast(text.as_bytes(), OpCode::Text, None)
    }

    /// Sends a binary message to every open connection.
    pub fn broadcast_binary(&self, data: &[u8]) -> Result<(), HandleError> {
        self.broadcast(data, OpCode::Binary, None)
    }

    /// Sends a text message to every connection subscribed to `topic` (see
    /// [`Ctx::subscribe`](super::Ctx::subscribe)).
    pub fn publish_text(&self, topic: &str, text: &str) -> Result<(), HandleError> {
        self.broadcast(text.as_bytes(), OpCode::Text, Some(topic))
    }

    /// Sends a binary message to every connection subscribed to `topic`.
    pub fn publish_binary(&self, topic: &str, data: &[u8]) -> Result<(), HandleError> {
        self.broadcast(data, OpCode::Binary, Some(topic))
    }

    /// Calls [`Handler::on_wake`](super::Handler::on_wake) on every loop's thread.
    pub fn wake(&self) -> Result<(), HandleError> {
        self.push_all(|| Command::Wake)
    }

    /// Swaps the server's certificate and key: from now on every new TLS handshake, on every
    /// loop, uses `tls`; connections already accepted keep the certificate they started with,
    /// and stay open. Make `tls` with [`ServerTls::reload`](crate::tls::ServerTls::reload) (the
    /// same files read again) or any other constructor; a bad file fails there, before anything
    /// is swapped. With [`ServerConfig::handle_signals`](super::ServerConfig::handle_signals)
    /// the server does this itself on SIGHUP.
    ///
    /// Fails with [`HandleError::NotTls`] on a server started without TLS, and
    /// [`HandleError::Stopped`] once it has stopped.
    #[cfg(feature = "tls")]
    pub fn reload_tls(&self, tls: crate::tls::ServerTls) -> Result<(), HandleError> {
        if self.is_stopped() {
            return Err(HandleError::Stopped);
        }
        let current = self.group.tls.as_ref().ok_or(HandleError::NotTls)?;
        current.set(tls);
        Ok(())
    }

    /// Starts a graceful shutdown, as SIGTERM would (draining first for
    /// [`ServerConfig::drain_timeout`](super::ServerConfig::drain_timeout)).
    pub fn shutdown(&self) -> Result<(), HandleError> {
        self.push_all(|| Command::Shutdown)
    }
}
