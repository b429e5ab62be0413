//! Publish/subscribe: named topics and their subscribers.
//!
//! Nothing here touches a connection's slot: a connection without subscriptions costs nothing,
//! and the server's per-connection size is unchanged. A topic exists while it has subscribers.
//! Publishing walks one topic's subscriber list (O(subscribers)); a connection's subscriptions
//! are found by its slot key, so ending them when it closes is O(its subscriptions).
//!
//! A topic's first subscriber and its last leaving are reported to the caller (a clustered
//! server subscribes to the topic's channel while the topic has subscribers on any loop).

use super::handler::ConnId;

/// A topic and its subscribers, in no particular order: the local part of their ids
/// ([`ConnId::as_u64`]; a loop's connections share one instance), 8 bytes each.
struct Topic {
    name: Box<str>,
    subs: Vec<u64>,
}

/// The slot key in the local part of a connection's id.
fn key_of(local: u64) -> usize {
    ConnId::from_parts(0, local).key()
}

/// One subscription of a connection: the topic, and the connection's place in its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sub {
    topic: u32,
    at: u32,
}

/// Every topic that has subscribers, and the subscriptions of every connection that has any.
#[derive(Default)]
pub(crate) struct Topics {
    topics: slab::Slab<Topic>,
    /// Topic keys, sorted by name.
    by_name: Vec<u32>,
    /// Each subscribed connection's subscriptions, by slot key.
    members: KeyMap<Vec<Sub>>,
    /// Ends a closed connection's subscriptions; set by the first subscription, so that a
    /// program that never subscribes (the `wsloop` binary) does not carry that code at all.
    cleanup: Option<Cleanup>,
}

/// Ends the subscriptions of the connection in a slot, telling each topic left without
/// subscribers.
type Cleanup = fn(&mut Topics, usize, &mut dyn FnMut(&str));

/// What a subscription changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Joined {
    /// The connection was already subscribed.
    Already,
    /// Subscribed to a topic that had subscribers here.
    Member,
    /// Subscribed, the topic's first subscriber here.
    First,
}

/// What an unsubscription changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Left {
    /// The connection was not subscribed.
    NotMember,
    /// Unsubscribed; the topic keeps other subscribers here.
    Member,
    /// Unsubscribed, the topic's last subscriber here: it is gone.
    Last,
}

impl Topics {
    /// The topic called `name`, if it has subscribers.
    pub(crate) fn find(&self, name: &str) -> Option<u32> {
        self.position(name).ok().map(|i| self.by_name[i])
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.by_name
            .binary_search_by(|&t| (*self.topics[t as usize].name).cmp(name))
    }

    /// The `i`th subscriber of topic `t`, a connection of `instance`.
    pub(crate) fn subscriber(&self, t: u32, i: usize, instance: u64) -> Option<ConnId> {
        let local = *self.topics.get(t as usize)?.subs.get(i)?;
        Some(ConnId::from_parts(instance, local))
    }

    /// How many connections are subscribed to `name`.
    pub(crate) fn count(&self, name: &str) -> usize {
        self.find(name).map_or(0, |t| self.topics[t as usize].subs.len())
    }

    /// Subscribes `id`.
    pub(crate) fn subscribe(&mut self, id: ConnId, name: &str) -> Joined {
        self.cleanup = Some(Topics::remove_member);
        let mut first = false;
        let t = match self.position(name) {
            Ok(i) => self.by_name[i],
            Err(i) => {
                first = true;
                let t = self.topics.insert(Topic {
                    name: name.into(),
                    subs: Vec::new(),
                }) as u32;
                self.by_name.insert(i, t);
                t
            }
        };
        let subs = self.members.get_or_default(id.key() as u32);
        if subs.iter().any(|s| s.topic == t) {
            return Joined::Already;
        }
        let topic = &mut self.topics[t as usize];
        subs.push(Sub {
            topic: t,
            at: topic.subs.len() as u32,
        });
        topic.subs.push(id.as_u64());
        if first {
            Joined::First
        } else {
            Joined::Member
        }
    }

    /// Unsubscribes `id`.
    pub(crate) fn unsubscribe(&mut self, id: ConnId, name: &str) -> Left {
        let Some(t) = self.find(name) else {
            return Left::NotMember;
        };
        let key = id.key() as u32;
        let Some(subs) = self.members.get_mut(key) else {
            return Left::NotMember;
        };
        let Some(i) = subs.iter().position(|s| s.topic == t) else {
            return Left::NotMember;
        };
        // The slot may belong to a later connection than `id` by now.
        if self.topics[t as usize].subs.get(subs[i].at as usize) != Some(&id.as_u64()) {
            return Left::NotMember;
        }
        let sub = subs.swap_remove(i);
        if subs.is_empty() {
            self.members.remove(key);
        }
        match self.detach(sub) {
            Some(_) => Left::Last,
            None => Left::Member,
        }
    }

    /// Ends every subscription of the connection in slot `key`; `gone` is called with each
    /// topic left without subscribers.
    pub(crate) fn remove_conn(&mut self, key: usize, gone: &mut dyn FnMut(&str)) {
        if let Some(cleanup) = self.cleanup {
            cleanup(self, key, gone);
        }
    }

    fn remove_member(&mut self, key: usize, gone: &mut dyn FnMut(&str)) {
        if let Some(subs) = self.members.remove(key as u32) {
            for sub in subs {
                if let Some(name) = self.detach(sub) {
                    gone(&name);
                }
            }
        }
    }

    /// Takes a subscriber out of its topic's list; the last one takes its place. A topic left
    /// without subscribers goes: its name is returned.
    fn detach(&mut self, sub: Sub) -> Option<Box<str>> {
        let t = sub.topic as usize;
        let subs = &mut self.topics[t].subs;
        subs.swap_remove(sub.at as usize);
        if let Some(moved) = subs.get(sub.at as usize) {
            if let Some(s) = self
                .members
                .get_mut(key_of(*moved) as u32)
                .and_then(|subs| subs.iter_mut().find(|s| s.topic == sub.topic))
            {
                s.at = sub.at;
            }
        } else if subs.is_empty() {
            if let Ok(i) = self.position(&self.topics[t].name) {
                self.by_name.remove(i);
            }
            return Some(self.topics.remove(t).name);
        }
        None
    }
}

/// Values by connection slot key: open addressing with linear probing. Slab keys are small
/// integers, which a multiplicative hash spreads well (no hashing crate, no per-map seed).
struct KeyMap<V> {
    buckets: Vec<Option<(u32, V)>>,
    len: usize,
}

impl<V> Default for KeyMap<V> {
    fn default() -> Self {
        KeyMap {
            buckets: Vec::new(),
            len: 0,
        }
    }
}

impl<V: Default> KeyMap<V> {
    fn home(&self, key: u32) -> usize {
        let bits = self.buckets.len().trailing_zeros();
        (key.wrapping_mul(0x9E37_79B9) as u64 >> (32 - bits)) as usize
    }

    /// Where `key` is, or the empty bucket where it would go.
    fn slot(&self, key: u32) -> usize {
        let mask = self.buckets.len() - 1;
        let mut i = self.home(key);
        while let Some((k, _)) = &self.buckets[i] {
            if *k == key {
                break;
            }
            i = (i + 1) & mask;
        }
        i
    }

    fn get_mut(&mut self, key: u32) -> Option<&mut V> {
        if self.len == 0 {
            return None;
        }
        let i = self.slot(key);
        self.buckets[i].as_mut().map(|(_, v)| v)
    }

    fn get_or_default(&mut self, key: u32) -> &mut V {
        // At most three quarters full, so probes stay short and always find an empty bucket.
        if (self.len + 1) * 4 > self.buckets.len() * 3 {
            let old = std::mem::take(&mut self.buckets);
            self.buckets.resize_with((old.len() * 2).max(8), || None);
            for (k, v) in old.into_iter().flatten() {
                let i = self.slot(k);
                self.buckets[i] = Some((k, v));
            }
        }
        let i = self.slot(key);
        if self.buckets[i].is_none() {
            self.len += 1;
        }
        &mut self.buckets[i].get_or_insert_with(|| (key, V::default())).1
    }

    fn remove(&mut self, key: u32) -> Option<V> {
        if self.len == 0 {
            return None;
        }
        let mask = self.buckets.len() - 1;
        let mut hole = self.slot(key);
        let (_, v) = self.buckets[hole].take()?;
        self.len -= 1;
        if self.len == 0 {
            self.buckets = Vec::new(); // the last subscriber gone: give the memory back
            return Some(v);
        }
        // Backward shift: pull later entries of the same run into the hole when their home
        // allows, so that no lookup stops early at it.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let Some((k, _)) = &self.buckets[j] else { break };
            let from_home = j.wrapping_sub(self.home(*k)) & mask;
            if from_home >= j.wrapping_sub(hole) & mask {
                self.buckets[hole] = self.buckets[j].take();
                hole = j;
            }
        }
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn key_map_agrees_with_a_hash_map() {
        let mut ours: KeyMap<u64> = KeyMap::default();
        let mut std_map: HashMap<u32, u64> = HashMap::new();
        let mut x = 12345u64;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Keys from a small range collide and form long runs; some from a wide one.
            let key = if x % 5 == 0 {
                (x >> 20) as u32
            } else {
                (x >> 40) as u32 % 300
            };
            match x % 3 {
                0 => assert_eq!(ours.remove(key), std_map.remove(&key), "step {step}"),
                1 => {
                    *ours.get_or_default(key) += step;
                    *std_map.entry(key).or_default() += step;
                }
                _ => assert_eq!(ours.get_mut(key).copied(), std_map.get(&key).copied(), "step {step}"),
            }
            assert_eq!(ours.len, std_map.len());
        }
        for (k, v) in &std_map {
            assert_eq!(ours.get_mut(*k), Some(&mut v.clone()));
        }
    }

    fn id(key: usize) -> ConnId {
        ConnId::new(key, 1, 0, 0)
    }

    /// Checks every cross-reference: each subscription's place in its topic, names sorted.
    fn check(t: &Topics) {
        let mut count = 0;
        for (k, topic) in t.topics.iter() {
            assert!(!topic.subs.is_empty(), "empty topic {} kept", topic.name);
            for (at, c) in topic.subs.iter().enumerate() {
                let subs = t
                    .members
                    .buckets
                    .iter()
                    .flatten()
                    .find(|(key, _)| *key as usize == key_of(*c));
                let sub = subs.and_then(|(_, s)| s.iter().find(|s| s.topic == k as u32));
                assert_eq!(sub.map(|s| s.at), Some(at as u32), "{c} in {}", topic.name);
                count += 1;
            }
        }
        let total: usize = t.members.buckets.iter().flatten().map(|(_, s)| s.len()).sum();
        assert_eq!(count, total);
        let names: Vec<&str> = t.by_name.iter().map(|&k| &*t.topics[k as usize].name).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        assert_eq!(names.len(), t.topics.len());
    }

    #[test]
    fn subscriptions_come_and_go() {
        let mut t = Topics::default();
        assert_eq!(t.subscribe(id(1), "b"), Joined::First);
        assert_eq!(t.subscribe(id(2), "b"), Joined::Member);
        assert_eq!(t.subscribe(id(3), "b"), Joined::Member);
        assert_eq!(t.subscribe(id(2), "a"), Joined::First);
        assert_eq!(t.subscribe(id(2), "a"), Joined::Already);
        check(&t);
        assert_eq!((t.count("a"), t.count("b"), t.count("c")), (1, 3, 0));
        // The last subscriber moves into its place.
        assert_eq!(t.unsubscribe(id(1), "b"), Left::Member);
        assert_eq!(t.unsubscribe(id(1), "b"), Left::NotMember);
        assert_eq!(t.unsubscribe(id(1), "nothing"), Left::NotMember);
        // Another connection in the same slot (another generation) is not this one.
        assert_eq!(t.unsubscribe(ConnId::new(2, 7, 0, 0), "b"), Left::NotMember);
        assert_eq!(t.count("b"), 2);
        check(&t);
        let mut gone = Vec::new();
        t.remove_conn(2, &mut |name| gone.push(name.to_string()));
        assert_eq!(gone, ["a"]);
        check(&t);
        assert_eq!((t.count("a"), t.count("b")), (0, 1));
        assert_eq!(t.find("a"), None);
        let b = t.find("b").unwrap();
        assert_eq!(t.subscriber(b, 0, 0), Some(id(3)));
        assert_eq!(t.subscriber(b, 1, 0), None);
        assert_eq!(t.subscriber(b, 0, 9), Some(ConnId::new(3, 1, 0, 9)));
        t.remove_conn(3, &mut |name| gone.push(name.to_string()));
        t.remove_conn(3, &mut |name| gone.push(name.to_string()));
        assert_eq!(gone, ["a", "b"]);
        assert_eq!(t.subscribe(id(4), "a"), Joined::First);
        assert_eq!(t.unsubscribe(id(4), "a"), Left::Last);
        check(&t);
        assert!(t.topics.is_empty() && t.by_name.is_empty() && t.members.buckets.is_empty());
    }

    #[test]
    fn many_connections_and_topics_stay_consistent() {
        let mut t = Topics::default();
        // The topics as the reports of first and last subscribers tell them.
        let mut reported = std::collections::BTreeSet::new();
        let names: Vec<String> = (0..40).map(|i| format!("room-{i}")).collect();
        let mut x = 99u64;
        for step in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let conn = id((x % 500) as usize);
            let name = &names[(x >> 32) as usize % names.len()];
            match (x >> 16) % 7 {
                0 => t.remove_conn(conn.key(), &mut |name| assert!(reported.remove(name))),
                1 | 2 => {
                    if t.unsubscribe(conn, name) == Left::Last {
                        assert!(reported.remove(name.as_str()));
                    }
                }
                _ => {
                    if t.subscribe(conn, name) == Joined::First {
                        assert!(reported.insert(name.clone()));
                    }
                }
            }
            if step % 500 == 0 {
                check(&t);
                let names: Vec<&str> = t.by_name.iter().map(|&k| &*t.topics[k as usize].name).collect();
                assert!(
                    reported.iter().map(String::as_str).eq(names.iter().copied()),
                    "step {step}"
                );
            }
        }
        check(&t);
        for k in 0..500 {
            t.remove_conn(k, &mut |name| assert!(reported.remove(name)));
        }
        assert!(reported.is_empty());
        assert!(t.topics.is_empty() && t.by_name.is_empty() && t.members.len == 0);
    }
}
