//! The cluster's membership: each member's ID, name, peer and client URLs
//! and role (voter or learner), the IDs removed for good, and the cluster
//! ID. The raft core owns it and changes it only in log order (membership
//! changes and published attributes are raft entries), so every member
//! holds the same membership at the same index.
//!
//! It is kept in `data-dir/members` (rewritten atomically on each change),
//! travels in raft snapshot messages, and answers a joining member's
//! question "what is this cluster?" (`peer` join requests). `conf_index` is
//! the index of the last entry that changed it: on a restart or after a
//! snapshot, conf changes at or below it are already in it and are not
//! applied again.
//!
//! Text format, one fact per line:
//! ```text
//! cluster_id=<hex>
//! conf_index=<decimal>
//! member=<id hex> TAB <name> TAB <peer URLs, space separated> TAB <client URLs> TAB voter|learner
//! removed=<id hex>
//! alarm=<member id hex> <etcdserverpb.AlarmType number>
//! ```
//!
//! It also keeps the cluster's alarms (etcd keeps them in its backend):
//! raised and cleared through the log like the rest.

use crate::error::{self, Status};
use crate::proto::keelson::{member_change::Kind, MemberChange};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberInfo {
    /// Empty until the member publishes it (etcd's "unstarted").
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub learner: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub cluster_id: u64,
    pub conf_index: u64,
    pub members: BTreeMap<u64, MemberInfo>,
    pub removed: BTreeSet<u64>,
    /// (member ID, alarm type) pairs raised.
    pub alarms: BTreeSet<(u64, i32)>,
    /// The auth store (users, roles, enabled).
    pub auth: crate::auth::AuthState,
}

/// etcd 3.4's limit on learners in a cluster.
pub const MAX_LEARNERS: usize = 1;

pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

fn clean(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

impl Membership {
    pub fn voters(&self) -> impl Iterator<Item = u64> + '_ {
        self.members
            .iter()
            .filter(|(_, m)| !m.learner)
            .map(|(id, _)| *id)
    }

    pub fn learners(&self) -> impl Iterator<Item = u64> + '_ {
        self.members
            .iter()
            .filter(|(_, m)| m.learner)
            .map(|(id, _)| *id)
    }

    pub fn is_learner(&self, id: u64) -> bool {
        self.members.get(&id).map(|m| m.learner).unwrap_or(false)
    }

    pub fn conf_state(&self) -> raft::eraftpb::ConfState {
        raft::eraftpb::ConfState::from((
            self.voters().collect::<Vec<_>>(),
            self.learners().collect::<Vec<_>>(),
        ))
    }

    /// Voters that have published their name (etcd's "started").
    pub fn started_voters(&self) -> usize {
        self.members
            .values()
            .filter(|m| !m.learner && !m.name.is_empty())
            .count()
    }

    /// etcd's `ValidateConfigurationChange`: whether `ch` may apply to this
    /// membership. Deterministic: every member decides the same at apply.
    pub fn check(&self, ch: &MemberChange) -> Result<(), Status> {
        let kind = Kind::try_from(ch.kind).map_err(|_| error::member_not_found())?;
        if self.removed.contains(&ch.id) {
            // etcd maps ErrIDRemoved to "member not found", for adds too.
            return Err(error::member_not_found());
        }
        let existing = self.members.get(&ch.id);
        let url_taken = |except: Option<u64>| {
            self.members.iter().any(|(id, m)| {
                Some(*id) != except && m.peer_urls.iter().any(|u| ch.peer_urls.contains(u))
            })
        };
        match kind {
            Kind::Add => {
                if existing.is_some() {
                    return Err(error::member_exist());
                }
                if url_taken(None) {
                    return Err(error::peer_url_exist());
                }
                if ch.is_learner && self.learners().count() >= MAX_LEARNERS {
                    return Err(error::too_many_learners());
                }
            }
            Kind::Remove => {
                if existing.is_none() {
                    return Err(error::member_not_found());
                }
            }
            Kind::Update => {
                if existing.is_none() {
                    return Err(error::member_not_found());
                }
                if url_taken(Some(ch.id)) {
                    return Err(error::peer_url_exist());
                }
            }
            Kind::Promote => match existing {
                None => return Err(error::member_not_found()),
                Some(m) if !m.learner => return Err(error::member_not_learner()),
                Some(_) => {}
            },
        }
        Ok(())
    }

    /// The raft change that carries `ch` (after `check`).
    pub fn raft_change(&self, ch: &MemberChange) -> raft::eraftpb::ConfChangeType {
        use raft::eraftpb::ConfChangeType as T;
        match Kind::try_from(ch.kind).unwrap_or(Kind::Update) {
            Kind::Add if ch.is_learner => T::AddLearnerNode,
            Kind::Add | Kind::Promote => T::AddNode,
            Kind::Remove => T::RemoveNode,
            // No change for raft: the member keeps its role.
            Kind::Update if self.is_learner(ch.id) => T::AddLearnerNode,
            Kind::Update => T::AddNode,
        }
    }

    /// Applies a checked change made by the entry at `index`.
    pub fn apply(&mut self, index: u64, ch: &MemberChange) {
        self.conf_index = self.conf_index.max(index);
        match Kind::try_from(ch.kind) {
            Ok(Kind::Add) => {
                self.members.insert(
                    ch.id,
                    MemberInfo {
                        name: String::new(),
                        peer_urls: ch.peer_urls.clone(),
                        client_urls: Vec::new(),
                        learner: ch.is_learner,
                    },
                );
            }
            Ok(Kind::Remove) => {
                self.members.remove(&ch.id);
                self.removed.insert(ch.id);
            }
            Ok(Kind::Update) => {
                if let Some(m) = self.members.get_mut(&ch.id) {
                    m.peer_urls = ch.peer_urls.clone();
                }
            }
            Ok(Kind::Promote) => {
                if let Some(m) = self.members.get_mut(&ch.id) {
                    m.learner = false;
                }
            }
            Err(_) => {}
        }
    }

    /// A member's published name and client URLs (ignored for a member no
    /// longer in the cluster). Returns whether anything changed.
    pub fn set_attributes(
        &mut self,
        index: u64,
        id: u64,
        name: &str,
        client_urls: &[String],
    ) -> bool {
        let Some(m) = self.members.get_mut(&id) else {
            return false;
        };
        if m.name == name && m.client_urls == client_urls {
            return false;
        }
        m.name = name.to_string();
        m.client_urls = client_urls.to_vec();
        self.conf_index = self.conf_index.max(index);
        true
    }

    pub fn encode(&self) -> String {
        let mut s = format!(
            "cluster_id={:x}\nconf_index={}\n",
            self.cluster_id, self.conf_index
        );
        for (id, m) in &self.members {
            s.push_str(&format!(
                "member={id:x}\t{}\t{}\t{}\t{}\n",
                clean(&m.name),
                m.peer_urls
                    .iter()
                    .map(|u| clean(u))
                    .collect::<Vec<_>>()
                    .join(" "),
                m.client_urls
                    .iter()
                    .map(|u| clean(u))
                    .collect::<Vec<_>>()
                    .join(" "),
                if m.learner { "learner" } else { "voter" }
            ));
        }
        for id in &self.removed {
            s.push_str(&format!("removed={id:x}\n"));
        }
        for (id, kind) in &self.alarms {
            s.push_str(&format!("alarm={id:x} {kind}\n"));
        }
        self.auth.encode(&mut s);
        s
    }

    pub fn decode(text: &str) -> Result<Membership, String> {
        let mut m = Membership::default();
        let mut have_cluster = false;
        let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|_| format!("bad ID {v:?}"));
        let urls = |v: &str| -> Vec<String> {
            v.split(' ')
                .filter(|u| !u.is_empty())
                .map(|u| u.to_string())
                .collect()
        };
        for line in text.lines().filter(|l| !l.is_empty()) {
            match line.split_once('=') {
                Some(("cluster_id", v)) => {
                    m.cluster_id = hex(v)?;
                    have_cluster = true;
                }
                Some(("conf_index", v)) => {
                    m.conf_index = v.parse().map_err(|_| format!("bad conf_index {v:?}"))?
                }
                Some(("member", v)) => {
                    let f: Vec<&str> = v.split('\t').collect();
                    if f.len() != 5 || !matches!(f[4], "voter" | "learner") {
                        return Err(format!("bad member line {line:?}"));
                    }
                    let info = MemberInfo {
                        name: f[1].to_string(),
                        peer_urls: urls(f[2]),
                        client_urls: urls(f[3]),
                        learner: f[4] == "learner",
                    };
                    m.members.insert(hex(f[0])?, info);
                }
                Some(("removed", v)) => {
                    m.removed.insert(hex(v)?);
                }
                Some(("alarm", v)) => {
                    let (id, kind) = v
                        .split_once(' ')
                        .ok_or(format!("bad alarm line {line:?}"))?;
                    let kind = kind
                        .parse()
                        .map_err(|_| format!("bad alarm line {line:?}"))?;
                    m.alarms.insert((hex(id)?, kind));
                }
                Some((k @ ("auth" | "auth_user" | "auth_role"), v)) => {
                    m.auth
                        .decode_line(k, v)
                        .ok_or(format!("bad auth line {line:?}"))?;
                }
                _ => return Err(format!("unexpected line {line:?}")),
            }
        }
        if !have_cluster {
            return Err("no cluster_id".into());
        }
        if m.members.is_empty() {
            return Err("no members".into());
        }
        Ok(m)
    }

    /// Reads `path`; `Ok(None)` when it does not exist.
    pub fn load(path: &std::path::Path) -> Result<Option<Membership>, String> {
        match std::fs::read_to_string(path) {
            Ok(t) => Membership::decode(&t)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes `path` atomically (temporary file, fsync, rename, fsync of
    /// the directory).
    pub fn store(&self, path: &std::path::Path) -> Result<(), String> {
        let tmp = path.with_extension("tmp");
        let res = std::fs::write(&tmp, self.encode())
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, path))
            .and_then(|_| match path.parent() {
                Some(d) => std::fs::File::open(d)?.sync_all(),
                None => Ok(()),
            });
        res.map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Whether every URL is `http(s)://host:port` (etcd's `types.NewURLs`).
pub fn valid_peer_urls(urls: &[String]) -> bool {
    !urls.is_empty()
        && urls.iter().all(|u| {
            let rest = u
                .strip_prefix("http://")
                .or_else(|| u.strip_prefix("https://"));
            match rest {
                Some(r) => match r.rsplit_once(':') {
                    Some((host, port)) => {
                        !host.is_empty()
                            && !port.is_empty()
                            && port.chars().all(|c| c.is_ascii_digit())
                            && !r.contains('/')
                    }
                    None => false,
                },
                None => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Membership {
        let mut m = Membership {
            cluster_id: 0xabc,
            ..Default::default()
        };
        for (id, n) in [(1u64, "a"), (2, "b"), (3, "")] {
            m.members.insert(
                id,
                MemberInfo {
                    name: n.into(),
                    peer_urls: vec![format!("http://127.0.0.1:{}", 2380 + id)],
                    client_urls: vec![],
                    learner: false,
                },
            );
        }
        m
    }

    fn ch(kind: Kind, id: u64, urls: &[&str], learner: bool) -> MemberChange {
        MemberChange {
            kind: kind as i32,
            id,
            peer_urls: urls.iter().map(|u| u.to_string()).collect(),
            is_learner: learner,
        }
    }

    #[test]
    fn round_trip() {
        let mut m = three();
        m.removed.insert(9);
        m.alarms.insert((1, 1));
        m.conf_index = 42;
        m.members.get_mut(&2).unwrap().learner = true;
        m.members.get_mut(&1).unwrap().client_urls = vec!["http://x:1".into(), "http://y:2".into()];
        assert_eq!(Membership::decode(&m.encode()).unwrap(), m);
        assert!(Membership::decode("garbage").is_err());
        assert!(Membership::decode("cluster_id=1\n").is_err());
        assert!(Membership::decode("cluster_id=1\nmember=1\ta\n").is_err());
    }

    #[test]
    fn checks_like_etcd() {
        let mut m = three();
        let u = "http://127.0.0.1:9000";
        assert_eq!(
            m.check(&ch(Kind::Add, 1, &[u], false)),
            Err(error::member_exist())
        );
        assert_eq!(
            m.check(&ch(Kind::Add, 7, &["http://127.0.0.1:2381"], false)),
            Err(error::peer_url_exist())
        );
        assert_eq!(m.check(&ch(Kind::Add, 7, &[u], true)), Ok(()));
        m.apply(10, &ch(Kind::Add, 7, &[u], true));
        assert!(m.is_learner(7));
        assert_eq!(m.conf_index, 10);
        assert_eq!(
            m.check(&ch(Kind::Add, 8, &["http://127.0.0.1:9001"], true)),
            Err(error::too_many_learners())
        );
        assert_eq!(
            m.check(&ch(Kind::Promote, 1, &[], false)),
            Err(error::member_not_learner())
        );
        assert_eq!(
            m.check(&ch(Kind::Promote, 99, &[], false)),
            Err(error::member_not_found())
        );
        assert_eq!(m.check(&ch(Kind::Promote, 7, &[], false)), Ok(()));
        assert_eq!(
            m.raft_change(&ch(Kind::Update, 7, &[u], false)),
            raft::eraftpb::ConfChangeType::AddLearnerNode
        );
        m.apply(11, &ch(Kind::Promote, 7, &[], false));
        assert_eq!(m.voters().count(), 4);
        assert_eq!(
            m.check(&ch(Kind::Update, 2, &["http://127.0.0.1:2381"], false)),
            Err(error::peer_url_exist())
        );
        // Its own URLs are no clash.
        assert_eq!(
            m.check(&ch(Kind::Update, 2, &["http://127.0.0.1:2382"], false)),
            Ok(())
        );
        m.apply(12, &ch(Kind::Remove, 2, &[], false));
        assert_eq!(
            m.check(&ch(Kind::Remove, 2, &[], false)),
            Err(error::member_not_found())
        );
        assert_eq!(
            m.check(&ch(Kind::Add, 2, &["http://z:1"], false)),
            Err(error::member_not_found())
        );
        assert!(
            !m.set_attributes(13, 2, "b", &[]),
            "a removed member publishes nothing"
        );
        assert!(m.set_attributes(13, 3, "c", &["http://c:1".into()]));
        assert_eq!(m.started_voters(), 2, "7 has not published its name");
        assert_eq!(m.conf_state().voters, vec![1, 3, 7]);
    }

    #[test]
    fn peer_url_validation() {
        assert!(valid_peer_urls(&["http://127.0.0.1:2380".into()]));
        assert!(valid_peer_urls(&[
            "https://h:1".into(),
            "http://[::1]:2".into()
        ]));
        for bad in [
            "",
            "127.0.0.1:2380",
            "http://h",
            "http://h:x",
            "ftp://h:1",
            "http://:1",
            "http://h:1/p",
        ] {
            assert!(!valid_peer_urls(&[bad.into()]), "{bad}");
        }
        assert!(!valid_peer_urls(&[]));
    }
}
