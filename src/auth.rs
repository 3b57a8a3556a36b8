//! Authentication and authorization, as etcd's auth store: users with
//! passwords and roles, roles with key-range permissions, the `root` user
//! and role, enable/disable, and tokens.
//!
//! The state changes only through the raft log (`AuthChange` entries,
//! applied by the raft core in log order with the membership, checked at
//! apply as etcd's auth store checks them), so every member decides the
//! same. Each core gets an immutable copy (`Arc<AuthState>`) whenever it
//! changes and checks requests against it without asking another core.
//!
//! Passwords are kept as salted, iterated SHA-256 (etcd: bcrypt). The
//! member that receives `UserAdd`/`UserChangePassword` hashes the password
//! and only the hash goes through the log. Tokens are self-validating:
//! `<user hex>.<expiry ms>.<mac>`, the mac a SHA-256 over a cluster secret
//! (drawn when auth is enabled, carried in that entry) — so any member can
//! check any member's token, and a token expires after `--auth-token-ttl`
//! seconds (etcd's simple tokens: 300 s by default).

use crate::error::{Code, Status};
use crate::proto::authpb::{permission, Permission};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};

pub const ROOT: &str = "root";
const HASH_ROUNDS: u32 = 4096;

macro_rules! errs {
    ($($f:ident => ($code:ident, $msg:expr);)*) => {
        $(pub fn $f() -> Status { Status::new(Code::$code, $msg) })*
    };
}

errs! {
    root_user_not_exist => (FailedPrecondition, "etcdserver: root user does not exist");
    root_role_not_exist => (FailedPrecondition, "etcdserver: root user does not have root role");
    user_already_exist => (FailedPrecondition, "etcdserver: user name already exists");
    user_empty => (InvalidArgument, "etcdserver: user name is empty");
    user_not_found => (FailedPrecondition, "etcdserver: user name not found");
    role_already_exist => (FailedPrecondition, "etcdserver: role name already exists");
    role_not_found => (FailedPrecondition, "etcdserver: role name not found");
    role_empty => (InvalidArgument, "etcdserver: role name is empty");
    auth_failed => (InvalidArgument, "etcdserver: authentication failed, invalid user ID or password");
    permission_denied => (PermissionDenied, "etcdserver: permission denied");
    role_not_granted => (FailedPrecondition, "etcdserver: role is not granted to the user");
    permission_not_granted => (FailedPrecondition, "etcdserver: permission is not granted to the role");
    auth_not_enabled => (FailedPrecondition, "etcdserver: authentication is not enabled");
    invalid_auth_token => (Unauthenticated, "etcdserver: invalid auth token");
    invalid_auth_mgmt => (InvalidArgument, "etcdserver: invalid auth management");
    auth_old_revision => (InvalidArgument, "etcdserver: revision of auth store is old");
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    /// (salt, hash); None for a user added with no password (it cannot
    /// authenticate with one).
    pub password: Option<(Vec<u8>, Vec<u8>)>,
    pub roles: BTreeSet<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthState {
    pub enabled: bool,
    pub revision: u64,
    pub secret: Vec<u8>,
    pub users: BTreeMap<String, User>,
    /// Role → its permissions (type, key, range_end), sorted by key.
    pub roles: BTreeMap<String, Vec<(i32, Vec<u8>, Vec<u8>)>>,
}

pub fn hash_password(salt: &[u8], password: &str) -> Vec<u8> {
    let mut h = sha2::Sha256::new()
        .chain_update(salt)
        .chain_update(password.as_bytes())
        .finalize();
    for _ in 0..HASH_ROUNDS {
        h = sha2::Sha256::new()
            .chain_update(h)
            .chain_update(salt)
            .finalize();
    }
    h.to_vec()
}

/// Random bytes from the kernel (salts, the token secret).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: the buffer is valid for `n - filled` bytes.
        let r = unsafe {
            libc::getrandom(b[filled..].as_mut_ptr() as *mut libc::c_void, n - filled, 0)
        };
        if r <= 0 {
            // getrandom cannot fail on Linux past early boot; fall back to
            // the clock rather than panic.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let h = sha2::Sha256::digest(t.to_le_bytes());
            for (i, x) in b[filled..].iter_mut().enumerate() {
                *x = h[i % 32];
            }
            break;
        }
        filled += r as usize;
    }
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether [key, range_end) (etcd's range conventions: empty end is the
/// key alone, "\0" is every key from `key`) lies inside the permission's.
fn covers(p: &(i32, Vec<u8>, Vec<u8>), key: &[u8], end: &[u8]) -> bool {
    let (_, pk, pe) = p;
    if pe.is_empty() {
        return end.is_empty() && key == pk.as_slice();
    }
    let from_key = pe.as_slice() == [0];
    if key < pk.as_slice() {
        return false;
    }
    if from_key {
        return true;
    }
    if end.is_empty() {
        return key < pe.as_slice();
    }
    if end == [0] {
        return false;
    }
    end <= pe.as_slice()
}

impl AuthState {
    pub fn is_root(&self, user: &str) -> bool {
        self.users
            .get(user)
            .map(|u| u.roles.contains(ROOT))
            .unwrap_or(false)
    }

    /// Whether `user` may read (or write) [key, range_end).
    pub fn allowed(&self, user: &str, key: &[u8], range_end: &[u8], write: bool) -> bool {
        let Some(u) = self.users.get(user) else {
            return false;
        };
        if u.roles.contains(ROOT) {
            return true;
        }
        let want = if write {
            permission::Type::Write as i32
        } else {
            permission::Type::Read as i32
        };
        u.roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .any(|perms| {
                perms.iter().any(|p| {
                    (p.0 == want || p.0 == permission::Type::Readwrite as i32)
                        && covers(p, key, range_end)
                })
            })
    }

    pub fn check_password(&self, user: &str, password: &str) -> bool {
        match self.users.get(user).and_then(|u| u.password.as_ref()) {
            Some((salt, hash)) => hash_password(salt, password) == *hash,
            None => false,
        }
    }

    fn mac(&self, user: &str, expiry_ms: u64) -> String {
        let d = sha2::Sha256::new()
            .chain_update(&self.secret)
            .chain_update(user.as_bytes())
            .chain_update(expiry_ms.to_le_bytes())
            .finalize();
        hex(&d[..16])
    }

    pub fn token(&self, user: &str, now_ms: u64, ttl_ms: u64) -> String {
        let expiry = now_ms + ttl_ms;
        format!(
            "{}.{expiry}.{}",
            hex(user.as_bytes()),
            self.mac(user, expiry)
        )
    }

    /// The user a token names, if it is genuine, unexpired, and the user
    /// still exists.
    pub fn verify(&self, token: &str, now_ms: u64) -> Option<String> {
        let mut f = token.split('.');
        let user = String::from_utf8(unhex(f.next()?)?).ok()?;
        let expiry: u64 = f.next()?.parse().ok()?;
        let mac = f.next()?;
        if f.next().is_some() || expiry < now_ms || mac != self.mac(&user, expiry) {
            return None;
        }
        self.users.contains_key(&user).then_some(user)
    }

    /// Applies one change (etcd's auth store checks, in log order).
    pub fn apply(&mut self, c: &crate::proto::keelson::AuthChange) -> Result<(), Status> {
        use crate::proto::etcdserverpb as pb;
        use prost::Message;
        let bad = |_| Status::new(Code::Internal, "etcdserver: undecodable auth change");
        match c.method.as_str() {
            "AuthEnable" => {
                if self.enabled {
                    return Ok(());
                }
                let root = self.users.get(ROOT).ok_or_else(root_user_not_exist)?;
                if !root.roles.contains(ROOT) {
                    return Err(root_role_not_exist());
                }
                self.enabled = true;
                self.secret = c.secret.clone();
            }
            "AuthDisable" => self.enabled = false,
            "UserAdd" => {
                let r = pb::AuthUserAddRequest::decode(c.request.as_slice()).map_err(bad)?;
                if r.name.is_empty() {
                    return Err(user_empty());
                }
                if self.users.contains_key(&r.name) {
                    return Err(user_already_exist());
                }
                let no_password = r.options.map(|o| o.no_password).unwrap_or(false);
                self.users.insert(
                    r.name,
                    User {
                        password: (!no_password).then(|| (c.salt.clone(), c.hash.clone())),
                        roles: BTreeSet::new(),
                    },
                );
            }
            "UserDelete" => {
                let r = pb::AuthUserDeleteRequest::decode(c.request.as_slice()).map_err(bad)?;
                if self.enabled && r.name == ROOT {
                    return Err(invalid_auth_mgmt());
                }
                self.users.remove(&r.name).ok_or_else(user_not_found)?;
            }
            "UserChangePassword" => {
                let r =
                    pb::AuthUserChangePasswordRequest::decode(c.request.as_slice()).map_err(bad)?;
                let u = self.users.get_mut(&r.name).ok_or_else(user_not_found)?;
                u.password = Some((c.salt.clone(), c.hash.clone()));
            }
            "UserGrantRole" => {
                let r = pb::AuthUserGrantRoleRequest::decode(c.request.as_slice()).map_err(bad)?;
                if r.role != ROOT && !self.roles.contains_key(&r.role) {
                    return Err(role_not_found());
                }
                let u = self.users.get_mut(&r.user).ok_or_else(user_not_found)?;
                u.roles.insert(r.role);
            }
            "UserRevokeRole" => {
                let r = pb::AuthUserRevokeRoleRequest::decode(c.request.as_slice()).map_err(bad)?;
                if self.enabled && r.name == ROOT && r.role == ROOT {
                    return Err(invalid_auth_mgmt());
                }
                let u = self.users.get_mut(&r.name).ok_or_else(user_not_found)?;
                if !u.roles.remove(&r.role) {
                    return Err(role_not_granted());
                }
            }
            "RoleAdd" => {
                let r = pb::AuthRoleAddRequest::decode(c.request.as_slice()).map_err(bad)?;
                if r.name.is_empty() {
                    return Err(role_empty());
                }
                if self.roles.contains_key(&r.name) {
                    return Err(role_already_exist());
                }
                self.roles.insert(r.name, Vec::new());
            }
            "RoleDelete" => {
                let r = pb::AuthRoleDeleteRequest::decode(c.request.as_slice()).map_err(bad)?;
                if self.enabled && r.role == ROOT {
                    return Err(invalid_auth_mgmt());
                }
                self.roles.remove(&r.role).ok_or_else(role_not_found)?;
                for u in self.users.values_mut() {
                    u.roles.remove(&r.role);
                }
            }
            "RoleGrantPermission" => {
                let r = pb::AuthRoleGrantPermissionRequest::decode(c.request.as_slice())
                    .map_err(bad)?;
                let perms = self.roles.get_mut(&r.name).ok_or_else(role_not_found)?;
                let p = r.perm.unwrap_or_default();
                // As etcd keeps them: sorted by key; the same range granted
                // again (found where a binary search by key lands) replaces
                // its type, anything else is added and the list sorted again.
                let at = perms.partition_point(|q| q.1 < p.key);
                match perms.get_mut(at) {
                    Some(q) if q.1 == p.key && q.2 == p.range_end => q.0 = p.perm_type,
                    _ => {
                        perms.push((p.perm_type, p.key, p.range_end));
                        perms.sort_by(|a, b| a.1.cmp(&b.1));
                    }
                }
            }
            "RoleRevokePermission" => {
                let r = pb::AuthRoleRevokePermissionRequest::decode(c.request.as_slice())
                    .map_err(bad)?;
                let perms = self.roles.get_mut(&r.role).ok_or_else(role_not_found)?;
                let before = perms.len();
                perms.retain(|q| !(q.1 == r.key && q.2 == r.range_end));
                if perms.len() == before {
                    return Err(permission_not_granted());
                }
            }
            other => {
                return Err(Status::new(
                    Code::Internal,
                    format!("etcdserver: unknown auth change {other:?}"),
                ))
            }
        }
        self.revision += 1;
        Ok(())
    }

    pub fn permissions(&self, role: &str) -> Option<Vec<Permission>> {
        self.roles.get(role).map(|ps| {
            ps.iter()
                .map(|(t, k, e)| Permission {
                    perm_type: *t,
                    key: k.clone(),
                    range_end: e.clone(),
                })
                .collect()
        })
    }

    /// Lines for the membership file (hex keeps them one line each).
    pub fn encode(&self, out: &mut String) {
        out.push_str(&format!(
            "auth={} {} {}\n",
            self.enabled as u8,
            self.revision,
            hex(&self.secret)
        ));
        for (name, u) in &self.users {
            let (salt, hash) = u.password.clone().unwrap_or_default();
            let roles: Vec<String> = u.roles.iter().map(|r| hex(r.as_bytes())).collect();
            out.push_str(&format!(
                "auth_user={} {} {} {} {}\n",
                hex(name.as_bytes()),
                u.password.is_some() as u8,
                hex(&salt),
                hex(&hash),
                roles.join(",")
            ));
        }
        for (name, perms) in &self.roles {
            let ps: Vec<String> = perms
                .iter()
                .map(|(t, k, e)| format!("{t}:{}:{}", hex(k), hex(e)))
                .collect();
            out.push_str(&format!(
                "auth_role={} {}\n",
                hex(name.as_bytes()),
                ps.join(",")
            ));
        }
    }

    /// Reads one line `encode` wrote (key without `=`, value after it).
    pub fn decode_line(&mut self, key: &str, v: &str) -> Option<()> {
        let s = |h: &str| String::from_utf8(unhex(h)?).ok();
        let f: Vec<&str> = v.split(' ').collect();
        match key {
            "auth" => {
                self.enabled = *f.first()? == "1";
                self.revision = f.get(1)?.parse().ok()?;
                self.secret = unhex(f.get(2)?)?;
            }
            "auth_user" => {
                let name = s(f.first()?)?;
                let has_pw = *f.get(1)? == "1";
                let salt = unhex(f.get(2)?)?;
                let hash = unhex(f.get(3)?)?;
                let roles = f
                    .get(4)?
                    .split(',')
                    .filter(|r| !r.is_empty())
                    .map(s)
                    .collect::<Option<BTreeSet<_>>>()?;
                self.users.insert(
                    name,
                    User {
                        password: has_pw.then_some((salt, hash)),
                        roles,
                    },
                );
            }
            "auth_role" => {
                let name = s(f.first()?)?;
                let mut perms = Vec::new();
                for p in f.get(1)?.split(',').filter(|p| !p.is_empty()) {
                    let mut q = p.split(':');
                    perms.push((
                        q.next()?.parse().ok()?,
                        unhex(q.next()?)?,
                        unhex(q.next()?)?,
                    ));
                }
                self.roles.insert(name, perms);
            }
            _ => return None,
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb as pb;
    use crate::proto::keelson::AuthChange;
    use prost::Message;

    fn change(method: &str, req: impl Message) -> AuthChange {
        AuthChange {
            method: method.into(),
            request: req.encode_to_vec(),
            salt: b"salt".to_vec(),
            hash: hash_password(b"salt", "pw"),
            secret: b"secret".to_vec(),
        }
    }

    #[test]
    fn users_roles_permissions_tokens() {
        let mut a = AuthState::default();
        assert_eq!(
            a.apply(&change("AuthEnable", pb::AuthEnableRequest {})),
            Err(root_user_not_exist())
        );
        let add = |n: &str| pb::AuthUserAddRequest {
            name: n.into(),
            ..Default::default()
        };
        a.apply(&change("UserAdd", add("root"))).unwrap();
        assert_eq!(
            a.apply(&change("UserAdd", add("root"))),
            Err(user_already_exist())
        );
        assert_eq!(
            a.apply(&change("AuthEnable", pb::AuthEnableRequest {})),
            Err(root_role_not_exist())
        );
        let grant = |u: &str, r: &str| pb::AuthUserGrantRoleRequest {
            user: u.into(),
            role: r.into(),
        };
        a.apply(&change("UserGrantRole", grant("root", "root")))
            .unwrap();
        a.apply(&change("AuthEnable", pb::AuthEnableRequest {}))
            .unwrap();
        assert!(a.enabled && a.check_password("root", "pw") && !a.check_password("root", "x"));
        assert_eq!(
            a.apply(&change(
                "UserDelete",
                pb::AuthUserDeleteRequest {
                    name: "root".into()
                }
            )),
            Err(invalid_auth_mgmt())
        );
        a.apply(&change("UserAdd", add("u"))).unwrap();
        assert_eq!(
            a.apply(&change("UserGrantRole", grant("u", "r"))),
            Err(role_not_found())
        );
        a.apply(&change(
            "RoleAdd",
            pb::AuthRoleAddRequest { name: "r".into() },
        ))
        .unwrap();
        a.apply(&change("UserGrantRole", grant("u", "r"))).unwrap();
        let perm = |t: permission::Type, k: &[u8], e: &[u8]| pb::AuthRoleGrantPermissionRequest {
            name: "r".into(),
            perm: Some(Permission {
                perm_type: t as i32,
                key: k.to_vec(),
                range_end: e.to_vec(),
            }),
        };
        a.apply(&change(
            "RoleGrantPermission",
            perm(permission::Type::Read, b"a", b"c"),
        ))
        .unwrap();
        a.apply(&change(
            "RoleGrantPermission",
            perm(permission::Type::Write, b"k", b""),
        ))
        .unwrap();
        a.apply(&change(
            "RoleGrantPermission",
            perm(permission::Type::Readwrite, b"z", b"\0"),
        ))
        .unwrap();
        // Kept sorted by key as etcd keeps them (RoleGet lists them so),
        // and a range granted again changes its type in place.
        a.apply(&change(
            "RoleGrantPermission",
            perm(permission::Type::Read, b"d", b""),
        ))
        .unwrap();
        a.apply(&change(
            "RoleGrantPermission",
            perm(permission::Type::Readwrite, b"d", b""),
        ))
        .unwrap();
        let listed: Vec<(Vec<u8>, i32)> = a
            .permissions("r")
            .unwrap()
            .into_iter()
            .map(|p| (p.key, p.perm_type))
            .collect();
        assert_eq!(
            listed,
            [
                (b"a".to_vec(), permission::Type::Read as i32),
                (b"d".to_vec(), permission::Type::Readwrite as i32),
                (b"k".to_vec(), permission::Type::Write as i32),
                (b"z".to_vec(), permission::Type::Readwrite as i32),
            ]
        );
        assert!(a.allowed("u", b"b", b"", false));
        assert!(a.allowed("u", b"a", b"c", false));
        assert!(!a.allowed("u", b"a", b"d", false));
        assert!(!a.allowed("u", b"b", b"", true));
        assert!(a.allowed("u", b"k", b"", true));
        assert!(!a.allowed("u", b"k", b"l", true));
        assert!(a.allowed("u", b"zz", b"\0", true));
        assert!(a.allowed("root", b"", b"\0", true));
        assert_eq!(
            a.apply(&change(
                "RoleRevokePermission",
                pb::AuthRoleRevokePermissionRequest {
                    role: "r".into(),
                    key: b"q".to_vec(),
                    range_end: vec![]
                }
            )),
            Err(permission_not_granted())
        );
        let t = a.token("u", 1000, 500);
        assert_eq!(a.verify(&t, 1200).as_deref(), Some("u"));
        assert_eq!(a.verify(&t, 1600), None, "expired");
        assert_eq!(a.verify(&t.replace(".", "x"), 1200), None);
        let forged = format!("{}.{}.{}", hex(b"root"), 1500, "00".repeat(16));
        assert_eq!(a.verify(&forged, 1200), None);
        let mut text = String::new();
        a.encode(&mut text);
        let mut b = AuthState::default();
        for line in text.lines() {
            let (k, v) = line.split_once('=').unwrap();
            b.decode_line(k, v).unwrap();
        }
        assert_eq!(a, b);
    }
}
