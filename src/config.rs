//! Server configuration: etcd's flags and `ETCD_*` environment variables,
//! plus keelson's own (`--cores`, `--shards`).
//!
//! Flags may be written `--flag value`, `--flag=value`, `-flag value` or
//! `-flag=value`, as Go's flag package (and so etcd) accepts. A flag given on
//! the command line wins over the matching environment variable. A flag that
//! is not known is an error, never silently ignored.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    /// `--wal-dir`: the WAL's own directory (default `data-dir/wal`).
    pub wal_dir: Option<PathBuf>,
    /// Where log lines go (`--log-outputs`).
    pub log_output: LogOutput,
    /// The most ops (and compares) a txn may have (`--max-txn-ops`).
    pub max_txn_ops: usize,
    /// `--auto-compaction-mode` and `--auto-compaction-retention`.
    pub auto_compaction: AutoCompaction,
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client_urls: Vec<String>,
    pub advertise_client_urls: Vec<String>,
    pub listen_peer_urls: Vec<String>,
    /// Client TLS (`https://` client URLs): etcd's `--cert-file`,
    /// `--key-file`, `--trusted-ca-file`, `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub trusted_ca_file: Option<PathBuf>,
    pub client_cert_auth: bool,
    /// Peer TLS (`https://` peer URLs): etcd's `--peer-cert-file`,
    /// `--peer-key-file`, `--peer-trusted-ca-file`,
    /// `--peer-client-cert-auth`.
    pub peer_cert_file: Option<PathBuf>,
    pub peer_key_file: Option<PathBuf>,
    pub peer_trusted_ca_file: Option<PathBuf>,
    pub peer_client_cert_auth: bool,
    /// `--experimental-peer-skip-client-san-verification`: a dialing
    /// peer's certificate is not matched against the address it dials from.
    pub peer_skip_client_san_verification: bool,
    /// etcd's `--auto-tls` and `--peer-auto-tls`: client (peer) TLS with a
    /// certificate the member generates under `data-dir/fixtures/`, when
    /// no certificate file is given (`tls::self_certs` then sets the files
    /// and clears the CA checks, as etcd replaces its TLS settings).
    pub auto_tls: bool,
    pub peer_auto_tls: bool,
    /// etcd's `--listen-metrics-urls`: HTTP/1 only (/metrics, /health).
    pub listen_metrics_urls: Vec<String>,
    pub initial_advertise_peer_urls: Vec<String>,
    pub initial_cluster: String,
    pub initial_cluster_state: String,
    pub initial_cluster_token: String,
    pub max_request_bytes: usize,
    /// `--quota-backend-bytes` as given: 0 is etcd's default (2 GiB), a
    /// negative value turns the quota off.
    pub quota_backend_bytes: i64,
    pub snapshot_count: u64,
    /// etcd's `--experimental-snapshot-catchup-entries`: raft log entries
    /// kept behind the applied index for slow followers (5000).
    pub snapshot_catchup_entries: u64,
    /// etcd's `--auth-token-ttl`: how long an auth token is good for.
    pub auth_token_ttl: Duration,
    /// `--auth-token jwt,…`: JWT tokens instead of keelson's simple ones.
    pub jwt: Option<std::sync::Arc<crate::jwt::Jwt>>,
    /// etcd's `--strict-reconfig-check`: refuse membership changes that
    /// could lose quorum (started voters, every voter connected).
    pub strict_reconfig_check: bool,
    /// `--force-new-cluster`: this member's data becomes a one-member
    /// cluster (every other member removed) before it starts.
    pub force_new_cluster: bool,
    /// `--experimental-initial-corrupt-check`: compare this member's hash
    /// with its peers' at start, and stop on a mismatch.
    pub initial_corrupt_check: bool,
    /// `--enable-pprof`: accepted (etcd's Procfile passes it); keelson has
    /// no Go runtime profiler, so it only logs that at start.
    pub enable_pprof: bool,
    /// etcd's `--enable-v2`: accepted with a warning (there is no v2 API;
    /// its requests get 404), so configurations written for etcd start.
    pub enable_v2: bool,
    /// `--unsafe-no-fsync`: WAL batches are not fdatasynced.
    pub unsafe_no_fsync: bool,
    /// `--pre-vote` (default true here, as in etcd 3.5; 3.4's is false).
    pub pre_vote: bool,
    /// `--initial-election-tick-advance` (default true): at start, once the
    /// connections to more than one peer are up, fast-forward the election
    /// clock to two ticks short of the timeout, as etcd's `adjustTicks`.
    pub initial_election_tick_advance: bool,
    /// `--enable-grpc-gateway`: the JSON gateway on the client port.
    pub grpc_gateway: bool,
    /// `--max-concurrent-streams`: HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    /// Executors (threads), one per core.
    pub cores: usize,
    /// Keyspace shards; fixed when the data dir is created.
    pub shards: Option<usize>,
    pub log_level: u8,
    /// etcd's `--experimental-watch-progress-notify-interval` (10m).
    pub watch_progress_notify_interval: Duration,
    /// etcd's `--experimental-enable-lease-checkpoint`: the leader records
    /// leases' remaining TTLs in the log every this often (keelson's own
    /// `--lease-checkpoint-interval`, etcd's fixed 5 minutes by default),
    /// so a new leader carries them on; `None`: off.
    pub lease_checkpoint: Option<Duration>,
    /// etcd's `--grpc-keepalive-interval` and `--grpc-keepalive-timeout`
    /// (2h, 20s): the server pings each gRPC connection every interval and
    /// closes one that has not answered within the timeout; `None` when
    /// either is 0 (no pings, as etcd then sets no keepalive).
    pub grpc_keepalive: Option<(Duration, Duration)>,
    /// etcd's `--experimental-corrupt-check-time` (0: off): how often the
    /// leader compares its hash with every member's.
    pub corrupt_check_every: Option<Duration>,
    /// etcd's `--cors`: origins the client port's HTTP answers allow; empty
    /// or `*` allows every origin (the default).
    pub cors: Vec<String>,
    /// etcd's `--host-whitelist`: Host names a plain-HTTP request to the
    /// client port may name; empty or `*` allows every name (the default).
    pub host_whitelist: Vec<String>,
    /// etcd's `--cipher-suites`: the TLS 1.2 cipher suites offered, by
    /// Go's names, for client and peer TLS alike (empty: rustls's
    /// defaults). TLS 1.3's suites stay on, as in Go.
    pub cipher_suites: Vec<String>,
    /// etcd's `--client-cert-allowed-hostname`: a client certificate must
    /// also be valid for this DNS name (or IP).
    pub client_cert_allowed_hostname: Option<String>,
    /// etcd's `--peer-cert-allowed-cn`: a peer's certificate (either side
    /// of a peer connection) must have this subject common name.
    pub peer_cert_allowed_cn: Option<String>,
    /// etcd's `--peer-cert-allowed-hostname`: a peer's certificate must be
    /// valid for this DNS name (or IP).
    pub peer_cert_allowed_hostname: Option<String>,
    /// etcd's `--client-crl-file` and `--peer-crl-file`: certificate
    /// revocation lists a presented client (or dialing peer) certificate
    /// is checked against.
    pub client_crl_file: Option<PathBuf>,
    pub peer_crl_file: Option<PathBuf>,
}

impl Config {
    /// The shard count a new data dir gets: `--shards`, else one per core,
    /// except with 2 cores or fewer, where it is one shard (on the raft
    /// core). There a write to a shard on the other core costs two more
    /// cross-core hand-offs per batch (the entry out, its result back),
    /// each a wake-up of a sleeping core, which cost more than the apply
    /// work they move: measured on 2 cores, puts took about a fifth less
    /// server CPU with one shard than with two, and serializable reads
    /// the same (perf/RESULTS.md, 2026-12-02).
    pub fn new_data_dir_shards(&self) -> usize {
        match self.shards {
            Some(n) => n.max(1),
            None if self.cores <= 2 => 1,
            None => self.cores.max(1),
        }
    }

    /// Where the WAL is: `--wal-dir`, else `data-dir/wal`.
    pub fn wal_path(&self) -> PathBuf {
        self.wal_dir
            .clone()
            .unwrap_or_else(|| crate::wal::wal_dir(&self.data_dir))
    }

    /// The database size past which puts, txns and lease grants are
    /// refused and NOSPACE raised, as etcd's backend quota: 0 means etcd's
    /// default (2 GiB), a negative value no quota. Above 8 GiB etcd only
    /// warns, and so does this (at startup).
    pub fn quota_bytes(&self) -> Option<u64> {
        match self.quota_backend_bytes {
            q if q < 0 => None,
            0 => Some(DEFAULT_QUOTA_BYTES),
            q => Some(q as u64),
        }
    }
}

/// etcd's default backend quota (2 GiB) and the most it recommends (8 GiB).
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
pub const MAX_QUOTA_BYTES: u64 = 8 << 30;

/// The largest `--max-request-bytes` keelson accepts: a value is one record
/// of a segment file, and records stay well under
/// `store::segment::RECORD_BYTES_MAX` (etcd takes any size and warns above
/// 10 MiB).
pub const MAX_REQUEST_BYTES_LIMIT: u64 = 128 * 1024 * 1024;

/// gRPC adds this much room above `--max-request-bytes` before the transport
/// itself refuses a message, as etcd does (grpcOverheadBytes).
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

pub enum Parsed {
    Serve(Box<Config>),
    Help,
    Version,
}

struct FlagSpec {
    name: &'static str,
    help: &'static str,
}

const BOOL_FLAGS: &[&str] = &[
    "strict-reconfig-check",
    "pre-vote",
    "enable-grpc-gateway",
    "unsafe-no-fsync",
    "client-cert-auth",
    "peer-client-cert-auth",
    "enable-v2",
    "debug",
    "enable-pprof",
    "force-new-cluster",
    "experimental-initial-corrupt-check",
    "auto-tls",
    "peer-auto-tls",
    "initial-election-tick-advance",
    "experimental-enable-lease-checkpoint",
    "experimental-peer-skip-client-san-verification",
];

const FLAGS: &[FlagSpec] = &[
    FlagSpec { name: "name", help: "human-readable name for this member (default \"default\")" },
    FlagSpec { name: "data-dir", help: "path to the data directory (default \"${name}.keelson\")" },
    FlagSpec { name: "listen-client-urls", help: "list of URLs to listen on for client traffic (default http://localhost:2379)" },
    FlagSpec { name: "advertise-client-urls", help: "list of this member's client URLs to advertise to the public (default http://localhost:2379)" },
    FlagSpec { name: "listen-peer-urls", help: "list of URLs to listen on for peer traffic (default http://localhost:2380)" },
    FlagSpec { name: "initial-advertise-peer-urls", help: "list of this member's peer URLs to advertise to the rest of the cluster (default http://localhost:2380)" },
    FlagSpec { name: "initial-cluster", help: "initial cluster configuration for bootstrapping (default \"default=http://localhost:2380\")" },
    FlagSpec { name: "initial-cluster-state", help: "initial cluster state ('new' or 'existing') (default \"new\")" },
    FlagSpec { name: "initial-cluster-token", help: "initial cluster token for the etcd cluster during bootstrap (default \"etcd-cluster\")" },
    FlagSpec { name: "max-request-bytes", help: "maximum client request size in bytes the server will accept (default 1572864)" },
    FlagSpec { name: "auto-compaction-retention", help: "auto compaction retention for mvcc key value store; 0 means disable auto compaction (default \"0\")" },
    FlagSpec { name: "auto-compaction-mode", help: "interpret 'auto-compaction-retention' one of: periodic|revision; 'periodic' for duration based retention, defaulting to hours if no time unit is provided (e.g. '5m'); 'revision' for revision number based retention (default \"periodic\")" },
    FlagSpec { name: "quota-backend-bytes", help: "raise alarms when backend size exceeds the given quota (0 defaults to 2 GiB)" },
    FlagSpec { name: "snapshot-count", help: "number of committed transactions to trigger a snapshot to disk (default 100000)" },
    FlagSpec { name: "heartbeat-interval", help: "time (in milliseconds) of a heartbeat interval (default 100)" },
    FlagSpec { name: "election-timeout", help: "time (in milliseconds) for an election to timeout (default 1000)" },
    FlagSpec { name: "unsafe-no-fsync", help: "disables fsync of the WAL, unsafe, will cause data loss (default false)" },
    FlagSpec { name: "pre-vote", help: "enable the raft Pre-Vote algorithm to prevent disruption when a node that has been partitioned away rejoins the cluster (default true)" },
    FlagSpec { name: "enable-grpc-gateway", help: "enable the JSON gateway on the client port (default true)" },
    FlagSpec { name: "max-concurrent-streams", help: "maximum concurrent HTTP/2 streams each client connection may have open (default 4096)" },
    FlagSpec { name: "wal-dir", help: "path to the dedicated wal directory (default data-dir/wal)" },
    FlagSpec { name: "max-txn-ops", help: "maximum number of operations permitted in a transaction (default 128)" },
    FlagSpec { name: "logger", help: "accepted for etcd's 'capnslog' and 'zap'; keelson's log lines are its own" },
    FlagSpec { name: "log-outputs", help: "where to write logs: 'default' or 'stderr', 'stdout', or one file path (default \"default\")" },
    FlagSpec { name: "debug", help: "enable debug-level logging (as --log-level debug)" },
    FlagSpec { name: "enable-v2", help: "accept etcd V2 client requests: accepted with a warning, keelson has no v2 API (its requests get 404) (default false)" },
    FlagSpec { name: "enable-pprof", help: "accepted; keelson has no Go runtime profiler, so /debug/pprof is not served (default false)" },
    FlagSpec { name: "force-new-cluster", help: "force to create a new one-member cluster from this member's data (default false)" },
    FlagSpec { name: "experimental-initial-corrupt-check", help: "enable to check data corruption before serving any client/peer traffic: keelson compares its hash with every reachable peer's at start and stops on a mismatch (default false)" },
    FlagSpec { name: "experimental-corrupt-check-time", help: "duration of time between cluster corruption check passes (0 to disable) (default 0s)" },
    FlagSpec { name: "max-snapshots", help: "accepted, no effect: keelson keeps the two newest shard checkpoints (etcd's default 5)" },
    FlagSpec { name: "max-wals", help: "accepted, no effect: keelson keeps the WAL segments from the newest checkpoint every shard has on (etcd's default 5)" },
    FlagSpec { name: "auth-token", help: "the auth token provider: 'simple' (keelson's own self-validating tokens) or 'jwt,priv-key=…,pub-key=…,sign-method=…,ttl=…'" },
    FlagSpec { name: "log-level", help: "configures log level: debug, info, warn, error (default info)" },
    FlagSpec { name: "grpc-keepalive-interval", help: "frequency duration of server-to-client ping to check if a connection is alive (0 to disable) (default 2h0m0s)" },
    FlagSpec { name: "grpc-keepalive-timeout", help: "additional duration of wait before closing a non-responsive connection (0 to disable) (default 20s)" },
    FlagSpec { name: "grpc-keepalive-min-time", help: "minimum interval duration that a client should wait before pinging server: accepted, not enforced by keelson (default 5s)" },
    FlagSpec { name: "experimental-watch-progress-notify-interval", help: "duration of periodic watch progress notifications (default 10m0s)" },
    FlagSpec { name: "experimental-snapshot-catchup-entries", help: "number of entries for a slow follower to catch up after compacting the raft storage entries (default 5000)" },
    FlagSpec { name: "cert-file", help: "path to the client server TLS cert file" },
    FlagSpec { name: "key-file", help: "path to the client server TLS key file" },
    FlagSpec { name: "trusted-ca-file", help: "path to the client server TLS trusted CA cert file" },
    FlagSpec { name: "client-cert-auth", help: "enable client cert authentication (default false)" },
    FlagSpec { name: "peer-cert-file", help: "path to the peer server TLS cert file" },
    FlagSpec { name: "peer-key-file", help: "path to the peer server TLS key file" },
    FlagSpec { name: "peer-trusted-ca-file", help: "path to the peer server TLS trusted CA file (keelson needs it for https peer URLs: it verifies every peer's certificate against it)" },
    FlagSpec { name: "peer-client-cert-auth", help: "enable peer client cert authentication (default false)" },
    FlagSpec { name: "listen-metrics-urls", help: "list of URLs to listen on for the /metrics and /health endpoints (default none)" },
    FlagSpec { name: "auth-token-ttl", help: "the lifetime in seconds of the auth token (default 300)" },
    FlagSpec { name: "strict-reconfig-check", help: "reject reconfiguration requests that would cause quorum loss (default true)" },
    FlagSpec { name: "cipher-suites", help: "comma-separated list of supported TLS 1.2 cipher suites between client/server and peers, by Go's names (empty: rustls's defaults; TLS 1.3 suites always on)" },
    FlagSpec { name: "cors", help: "comma-separated white list of origins for CORS on the client port's HTTP answers (empty or * means allow all) (default \"*\")" },
    FlagSpec { name: "host-whitelist", help: "comma-separated acceptable hostnames from HTTP client requests, if server is not secure (empty means allow all) (default \"*\")" },
    FlagSpec { name: "client-cert-allowed-hostname", help: "allowed TLS hostname for client cert authentication" },
    FlagSpec { name: "peer-cert-allowed-cn", help: "allowed CN for inter peer authentication" },
    FlagSpec { name: "peer-cert-allowed-hostname", help: "allowed TLS hostname for inter peer authentication" },
    FlagSpec { name: "client-crl-file", help: "path to the client certificate revocation list file (reread when it changes)" },
    FlagSpec { name: "peer-crl-file", help: "path to the peer certificate revocation list file (reread when it changes)" },
    FlagSpec { name: "auto-tls", help: "client TLS using generated certificates (when no --cert-file/--key-file is given)" },
    FlagSpec { name: "peer-auto-tls", help: "peer TLS using generated certificates (when no --peer-cert-file/--peer-key-file is given)" },
    FlagSpec { name: "experimental-peer-skip-client-san-verification", help: "do not match a dialing peer's certificate against the address it dials from" },
    FlagSpec { name: "metrics", help: "accepted ('basic' or 'extensive'): keelson's /metrics has one set" },
    FlagSpec { name: "initial-election-tick-advance", help: "whether to fast-forward the election clock at start, once peers are connected (default true)" },
    FlagSpec { name: "backend-batch-interval", help: "accepted, no effect: keelson has no bbolt backend (each raft batch is one commit)" },
    FlagSpec { name: "backend-batch-limit", help: "accepted, no effect: keelson has no bbolt backend (each raft batch is one commit)" },
    FlagSpec { name: "experimental-backend-bbolt-freelist-type", help: "accepted, no effect: keelson has no bbolt backend" },
    FlagSpec { name: "experimental-compaction-batch-limit", help: "accepted, no effect: a keelson shard compacts its in-memory index in one pass" },
    FlagSpec { name: "experimental-warning-apply-duration", help: "accepted, no effect: keelson does not time single applies (default 100ms)" },
    FlagSpec { name: "experimental-enable-lease-checkpoint", help: "enable leader to send regular checkpoints to other members to prevent reset of remaining TTL on leader change (default false)" },
    FlagSpec { name: "bcrypt-cost", help: "accepted, no effect: keelson hashes passwords with salted, iterated SHA-256, not bcrypt (default 10)" },
    FlagSpec { name: "log-package-levels", help: "accepted, no effect: capnslog's per-package levels (use --log-level)" },
    FlagSpec { name: "proxy", help: "etcd's v2 proxy mode: only 'off' (keelson has no v2 proxy) (default \"off\")" },
    FlagSpec { name: "proxy-failure-wait", help: "accepted, no effect (v2 proxy only)" },
    FlagSpec { name: "proxy-refresh-interval", help: "accepted, no effect (v2 proxy only)" },
    FlagSpec { name: "proxy-dial-timeout", help: "accepted, no effect (v2 proxy only)" },
    FlagSpec { name: "proxy-write-timeout", help: "accepted, no effect (v2 proxy only)" },
    FlagSpec { name: "proxy-read-timeout", help: "accepted, no effect (v2 proxy only)" },
    FlagSpec { name: "config-file", help: "path to the server configuration file (etcd's YAML); other flags and ETCD_* variables are then ignored" },
    FlagSpec { name: "cores", help: "keelson: number of executor threads, one per core (default: all cores)" },
    FlagSpec { name: "shards", help: "keelson: number of keyspace shards, fixed when the data dir is created (default: --cores, or 1 with 2 cores or fewer)" },
    FlagSpec { name: "lease-checkpoint-interval", help: "keelson: how often the leader checkpoints leases' remaining TTLs with --experimental-enable-lease-checkpoint (default 5m0s, etcd's fixed interval)" },
];

pub fn usage() -> String {
    let mut s = String::from(
        "Usage:\n  keelson [serve] [flags]\n  keelson gateway start [flags]   (etcd's L4 gateway; keelson gateway --help)\n  keelson snapshot status|restore FILE ...\n\nA distributed, reliable key-value store speaking the etcd v3 API.\n\nFlags (etcd's; each also read from ETCD_<FLAG> in the environment):\n",
    );
    for f in FLAGS {
        s.push_str(&format!("  --{}\n        {}\n", f.name, f.help));
    }
    s.push_str("  --help, --version\n");
    s
}

fn env_name(flag: &str) -> String {
    format!("ETCD_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// An `ETCD_`-prefixed environment variable that no flag reads (etcd logs
/// these as unrecognized and goes on).
pub fn unrecognized_env(key: &str) -> bool {
    key.starts_with("ETCD_") && !FLAGS.iter().any(|f| env_name(f.name) == key)
}

/// Parses the command line (without the program name) and the environment.
pub fn parse<I, E>(args: I, env: E) -> Result<Parsed, String>
where
    I: IntoIterator<Item = String>,
    E: Fn(&str) -> Option<String>,
{
    let mut args: Vec<String> = args.into_iter().collect();
    if args.first().map(|a| a == "serve").unwrap_or(false) {
        args.remove(0);
    }
    let mut given: Vec<(&'static str, String)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if !arg.starts_with('-') || arg == "-" || arg == "--" {
            return Err(format!("'{arg}' is not a valid flag"));
        }
        let body = arg.trim_start_matches('-');
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        match name {
            "h" | "help" => return Ok(Parsed::Help),
            "version" => return Ok(Parsed::Version),
            _ => {}
        }
        let spec = FLAGS
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| format!("flag provided but not defined: -{name}"))?;
        let value = match inline {
            Some(v) => v,
            // Boolean flags, as Go's flag package: present means true.
            None if BOOL_FLAGS.contains(&spec.name) => "true".to_string(),
            None => {
                i += 1;
                args.get(i)
                    .cloned()
                    .ok_or_else(|| format!("flag needs an argument: -{name}"))?
            }
        };
        given.push((spec.name, value));
        i += 1;
    }
    // etcd's --config-file: the file's settings, and nothing from the
    // command line or the environment ("other configuration command line
    // flags and environment variables will be ignored").
    let config_file = given
        .iter()
        .rev()
        .find(|(n, _)| *n == "config-file")
        .map(|(_, v)| v.clone())
        .or_else(|| env(&env_name("config-file")).filter(|v| !v.is_empty()));
    if let Some(path) = config_file {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("--config-file: {path}: {e}"))?;
        let args = config_file_args(&text).map_err(|e| format!("--config-file: {path}: {e}"))?;
        fn no_env(_: &str) -> Option<String> {
            None
        }
        return parse(args, no_env as fn(&str) -> Option<String>);
    }
    let lookup = |flag: &str| -> Option<String> {
        given
            .iter()
            .rev()
            .find(|(n, _)| *n == flag)
            .map(|(_, v)| v.clone())
            .or_else(|| env(&env_name(flag)).filter(|v| !v.is_empty()))
    };
    let list = |flag: &str, default: &str| -> Vec<String> {
        lookup(flag)
            .unwrap_or_else(|| default.to_string())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let signed = |flag: &str| -> Result<i64, String> {
        match lookup(flag) {
            None => Ok(0),
            Some(v) => v
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("invalid value {v:?} for flag -{flag}: parse error")),
        }
    };
    let num = |flag: &str, default: u64| -> Result<u64, String> {
        match lookup(flag) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("invalid value {v:?} for flag -{flag}: parse error")),
        }
    };

    let name = lookup("name").unwrap_or_else(|| "default".to_string());
    let data_dir = PathBuf::from(lookup("data-dir").unwrap_or_else(|| format!("{name}.keelson")));
    let initial_advertise_peer_urls = list("initial-advertise-peer-urls", "http://localhost:2380");
    let initial_cluster = lookup("initial-cluster").unwrap_or_else(|| {
        initial_advertise_peer_urls
            .iter()
            .map(|u| format!("{name}={u}"))
            .collect::<Vec<_>>()
            .join(",")
    });
    let initial_cluster_state = lookup("initial-cluster-state").unwrap_or_else(|| "new".into());
    if initial_cluster_state != "new" && initial_cluster_state != "existing" {
        return Err(format!(
            "invalid value {initial_cluster_state:?} for flag -initial-cluster-state: valid values are \"new\", \"existing\""
        ));
    }
    let heartbeat_ms = num("heartbeat-interval", 100)?;
    let election_ms = num("election-timeout", 1000)?;
    if heartbeat_ms == 0 || election_ms < 5 * heartbeat_ms {
        return Err(format!(
            "--election-timeout[{election_ms}ms] should be at least as 5 times as --heartbeat-interval[{heartbeat_ms}ms]"
        ));
    }
    let max_request_bytes = num("max-request-bytes", 1_572_864)?;
    if max_request_bytes > MAX_REQUEST_BYTES_LIMIT {
        return Err(format!(
            "--max-request-bytes[{max_request_bytes}] must be at most {MAX_REQUEST_BYTES_LIMIT} on keelson (one value is one record of a segment file)"
        ));
    }
    let cores = match num("cores", 0)? {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n as usize,
    };
    let shards = match lookup("shards") {
        None => None,
        Some(_) => match num("shards", 0)? {
            0 => return Err("--shards must be at least 1".into()),
            n if n > 4096 => return Err("--shards must be at most 4096".into()),
            n => Some(n as usize),
        },
    };
    let debug = match lookup("debug").as_deref() {
        None | Some("false") | Some("0") | Some("f") | Some("F") | Some("FALSE")
        | Some("False") => false,
        Some("true") | Some("1") | Some("t") | Some("T") | Some("TRUE") | Some("True") => true,
        Some(v) => {
            return Err(format!(
                "invalid boolean value {v:?} for -debug: parse error"
            ))
        }
    };
    let log_level = match lookup("log-level").as_deref() {
        _ if debug => 3,
        None | Some("info") => 2,
        Some("debug") => 3,
        Some("warn") => 1,
        Some("error") | Some("panic") | Some("fatal") => 0,
        Some(other) => return Err(format!("unknown log level {other:?}")),
    };
    let strict_reconfig_check = match lookup("strict-reconfig-check").as_deref() {
        None | Some("true") | Some("1") | Some("t") | Some("T") | Some("TRUE") | Some("True") => {
            true
        }
        Some("false") | Some("0") | Some("f") | Some("F") | Some("FALSE") | Some("False") => false,
        Some(v) => {
            return Err(format!(
                "invalid boolean value {v:?} for -strict-reconfig-check: parse error"
            ))
        }
    };
    let flag_bool = |flag: &str| -> Result<bool, String> {
        match lookup(flag).as_deref() {
            None | Some("false") | Some("0") | Some("f") | Some("F") | Some("FALSE")
            | Some("False") => Ok(false),
            Some("true") | Some("1") | Some("t") | Some("T") | Some("TRUE") | Some("True") => {
                Ok(true)
            }
            Some(v) => Err(format!(
                "invalid boolean value {v:?} for -{flag}: parse error"
            )),
        }
    };
    match lookup("logger").as_deref() {
        None | Some("zap") | Some("capnslog") => {}
        Some(other) => return Err(format!("unknown logger option {other:?}")),
    }
    let log_output = match lookup("log-outputs").as_deref() {
        None | Some("") | Some("default") | Some("stderr") => LogOutput::Stderr,
        Some("stdout") => LogOutput::Stdout,
        Some(v) if v.contains(',') => {
            return Err(format!(
                "--log-outputs {v:?}: keelson writes logs to one output"
            ))
        }
        Some(path) => LogOutput::File(PathBuf::from(path)),
    };
    let jwt = match lookup("auth-token").as_deref() {
        None | Some("simple") => None,
        Some(t) if t == "jwt" || t.starts_with("jwt,") => Some(std::sync::Arc::new(
            crate::jwt::Jwt::from_options(t.trim_start_matches("jwt"))
                .map_err(|e| format!("--auth-token: {e}"))?,
        )),
        Some(other) => {
            return Err(format!(
                "--auth-token {other:?}: unknown token type (etcd's are 'simple' and 'jwt')"
            ))
        }
    };
    let on_by_default = |flag: &str| -> Result<bool, String> {
        if lookup(flag).is_some() {
            flag_bool(flag)
        } else {
            Ok(true)
        }
    };
    let pre_vote = on_by_default("pre-vote")?;
    let grpc_gateway = on_by_default("enable-grpc-gateway")?;
    let max_concurrent_streams = match num("max-concurrent-streams", 4096)? {
        0 => return Err("--max-concurrent-streams must be at least 1".into()),
        n => n.min(u32::MAX as u64) as u32,
    };
    let max_txn_ops = match num("max-txn-ops", MAX_TXN_OPS as u64)? {
        0 => return Err("--max-txn-ops must be at least 1".into()),
        n => n.min(1 << 20) as usize,
    };
    let auto_compaction = parse_auto_compaction(
        &lookup("auto-compaction-mode").unwrap_or_else(|| "periodic".into()),
        &lookup("auto-compaction-retention").unwrap_or_else(|| "0".into()),
    )?;
    // Go durations ("2h0m0s", "20s"; a bare "0" too).
    let duration = |flag: &str, default: Duration| -> Result<Duration, String> {
        match lookup(flag) {
            None => Ok(default),
            Some(v) if v.trim() == "0" => Ok(Duration::ZERO),
            Some(v) => parse_duration(&v)
                .ok_or_else(|| format!("invalid value {v:?} for flag -{flag}: parse error")),
        }
    };
    let keepalive_interval = duration("grpc-keepalive-interval", Duration::from_secs(2 * 3600))?;
    let keepalive_timeout = duration("grpc-keepalive-timeout", Duration::from_secs(20))?;
    duration("grpc-keepalive-min-time", Duration::from_secs(5))?;
    let corrupt_check_every =
        Some(duration("experimental-corrupt-check-time", Duration::ZERO)?).filter(|d| !d.is_zero());
    // Retention of etcd's snap and WAL files: keelson keeps what its
    // recovery needs (README), so these are only checked.
    num("max-snapshots", 5)?;
    num("max-wals", 5)?;
    // etcd's tuning of what keelson does not have (bbolt, the v2 proxy,
    // capnslog, bcrypt, metrics levels): checked as etcd parses them, no
    // effect (README).
    duration("backend-batch-interval", Duration::ZERO)?;
    duration(
        "experimental-warning-apply-duration",
        Duration::from_millis(100),
    )?;
    for flag in ["backend-batch-limit", "experimental-compaction-batch-limit"] {
        signed(flag)?;
    }
    for flag in [
        "bcrypt-cost",
        "proxy-failure-wait",
        "proxy-refresh-interval",
        "proxy-dial-timeout",
        "proxy-write-timeout",
        "proxy-read-timeout",
    ] {
        num(flag, 0)?;
    }
    let initial_election_tick_advance = on_by_default("initial-election-tick-advance")?;
    let lease_checkpoint_interval = match lookup("lease-checkpoint-interval") {
        None => Duration::from_secs(300),
        Some(v) => match parse_duration(&v) {
            Some(d) if d >= Duration::from_secs(1) => d,
            _ => {
                return Err(format!(
                    "invalid value {v:?} for flag -lease-checkpoint-interval: a duration of at least 1s"
                ))
            }
        },
    };
    match lookup("proxy").as_deref() {
        None | Some("off") => {}
        Some(v @ ("on" | "readonly")) => {
            return Err(format!("--proxy={v}: keelson has no v2 proxy"))
        }
        Some(v) => {
            return Err(format!(
            "invalid value {v:?} for flag -proxy: valid values are \"off\", \"readonly\", \"on\""
        ))
        }
    }
    let cipher_suites = list("cipher-suites", "");
    if let Some(cs) = cipher_suites
        .iter()
        .find(|cs| !GO_CIPHER_SUITES.contains(&cs.as_str()))
    {
        return Err(format!("unexpected TLS cipher suite {cs:?}"));
    }
    let cors = list("cors", "*");
    for origin in cors.iter().filter(|o| *o != "*") {
        check_origin(origin)?;
    }
    let non_empty = |flag: &str| lookup(flag).filter(|v| !v.is_empty());
    let peer_cert_allowed_cn = non_empty("peer-cert-allowed-cn");
    let peer_cert_allowed_hostname = non_empty("peer-cert-allowed-hostname");
    if let (Some(cn), Some(host)) = (&peer_cert_allowed_cn, &peer_cert_allowed_hostname) {
        return Err(format!(
            "AllowedCN and AllowedHostname are mutually exclusive (cn={cn:?}, hostname={host:?})"
        ));
    }
    let grpc_keepalive = if keepalive_interval.is_zero() || keepalive_timeout.is_zero() {
        None
    } else {
        // grpc-go pings at most once a second.
        Some((
            keepalive_interval.max(Duration::from_secs(1)),
            keepalive_timeout,
        ))
    };
    let cfg = Config {
        cors,
        host_whitelist: list("host-whitelist", "*"),
        cipher_suites,
        client_cert_allowed_hostname: non_empty("client-cert-allowed-hostname"),
        peer_cert_allowed_cn,
        peer_cert_allowed_hostname,
        client_crl_file: non_empty("client-crl-file").map(PathBuf::from),
        peer_crl_file: non_empty("peer-crl-file").map(PathBuf::from),
        grpc_keepalive,
        corrupt_check_every,
        wal_dir: lookup("wal-dir").filter(|d| !d.is_empty()).map(PathBuf::from),
        log_output,
        max_txn_ops,
        auto_compaction,
        cert_file: lookup("cert-file").map(PathBuf::from),
        key_file: lookup("key-file").map(PathBuf::from),
        trusted_ca_file: lookup("trusted-ca-file").map(PathBuf::from),
        client_cert_auth: flag_bool("client-cert-auth")?,
        peer_cert_file: lookup("peer-cert-file").map(PathBuf::from),
        peer_key_file: lookup("peer-key-file").map(PathBuf::from),
        peer_trusted_ca_file: lookup("peer-trusted-ca-file").map(PathBuf::from),
        peer_client_cert_auth: flag_bool("peer-client-cert-auth")?,
        peer_skip_client_san_verification: flag_bool(
            "experimental-peer-skip-client-san-verification",
        )?,
        auto_tls: flag_bool("auto-tls")?,
        peer_auto_tls: flag_bool("peer-auto-tls")?,
        auth_token_ttl: Duration::from_secs(num("auth-token-ttl", 300)?.max(1)),
        jwt,
        strict_reconfig_check,
        unsafe_no_fsync: flag_bool("unsafe-no-fsync")?,
        force_new_cluster: flag_bool("force-new-cluster")?,
        initial_corrupt_check: flag_bool("experimental-initial-corrupt-check")?,
        enable_pprof: flag_bool("enable-pprof")?,
        enable_v2: flag_bool("enable-v2")?,
        pre_vote,
        initial_election_tick_advance,
        grpc_gateway,
        max_concurrent_streams,
        name,
        data_dir,
        listen_client_urls: list("listen-client-urls", "http://localhost:2379"),
        advertise_client_urls: list("advertise-client-urls", "http://localhost:2379"),
        listen_peer_urls: list("listen-peer-urls", "http://localhost:2380"),
        listen_metrics_urls: list("listen-metrics-urls", ""),
        initial_advertise_peer_urls,
        initial_cluster,
        initial_cluster_state,
        initial_cluster_token: lookup("initial-cluster-token")
            .unwrap_or_else(|| "etcd-cluster".into()),
        max_request_bytes: max_request_bytes as usize,
        quota_backend_bytes: match lookup("quota-backend-bytes") {
            None => 0,
            Some(v) => v.trim().parse::<i64>().map_err(|_| {
                format!("invalid value {v:?} for flag -quota-backend-bytes: parse error")
            })?,
        },
        snapshot_count: num("snapshot-count", 100_000)?,
        snapshot_catchup_entries: num("experimental-snapshot-catchup-entries", 5000)?.max(1),
        heartbeat_interval: Duration::from_millis(heartbeat_ms),
        election_timeout: Duration::from_millis(election_ms),
        cores: cores.clamp(1, 256),
        shards,
        log_level,
        watch_progress_notify_interval: match lookup("experimental-watch-progress-notify-interval") {
            None => Duration::from_secs(600),
            Some(v) => parse_duration(&v).ok_or_else(|| {
                format!("invalid value {v:?} for flag -experimental-watch-progress-notify-interval: parse error")
            })?,
        },
        lease_checkpoint: flag_bool("experimental-enable-lease-checkpoint")?
            .then_some(lease_checkpoint_interval),
    };
    cfg.validate()?;
    Ok(Parsed::Serve(Box::new(cfg)))
}

/// The flags an etcd YAML configuration file (`--config-file`) stands for,
/// as etcd 3.4's `embed.Config` reads it: each top-level key is the flag of
/// the same name, and `client-transport-security` and
/// `peer-transport-security` hold the client and peer TLS settings. Empty
/// values mean "not set"; lists are joined with commas; keys etcd reads
/// but keelson has no flag for are ignored, as etcd ignores keys it does
/// not know. The discovery keys (bootstrap through a discovery service)
/// are refused when set, as the flags are.
fn config_file_args(text: &str) -> Result<Vec<String>, String> {
    use yaml_rust2::{Yaml, YamlLoader};
    let docs = YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    let Some(doc) = docs.into_iter().next() else {
        return Ok(Vec::new());
    };
    let top = match doc {
        Yaml::Hash(h) => h,
        Yaml::Null => return Ok(Vec::new()),
        _ => return Err("not a mapping of settings".into()),
    };
    fn scalar(v: &Yaml) -> Result<Option<String>, String> {
        Ok(match v {
            Yaml::Null => None,
            Yaml::String(s) | Yaml::Real(s) if s.is_empty() => None,
            Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
            Yaml::Integer(i) => Some(i.to_string()),
            Yaml::Boolean(b) => Some(b.to_string()),
            Yaml::Array(a) => {
                let parts: Vec<String> = a
                    .iter()
                    .map(scalar)
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .flatten()
                    .collect();
                (!parts.is_empty()).then(|| parts.join(","))
            }
            _ => return Err("a value is neither a scalar nor a list".into()),
        })
    }
    let mut args = Vec::new();
    let mut push = |flag: &str, v: &Yaml| -> Result<(), String> {
        if let Some(v) = scalar(v).map_err(|e| format!("{flag}: {e}"))? {
            args.push(format!("--{flag}={v}"));
        }
        Ok(())
    };
    let known = |flag: &str| FLAGS.iter().any(|f| f.name == flag) && flag != "config-file";
    for (k, v) in &top {
        let Some(key) = k.as_str() else {
            return Err("a key is not a string".into());
        };
        let prefix = match key {
            "client-transport-security" => Some(""),
            "peer-transport-security" => Some("peer-"),
            _ => None,
        };
        if let Some(prefix) = prefix {
            let Yaml::Hash(tls) = v else {
                if matches!(v, Yaml::Null) {
                    continue;
                }
                return Err(format!("{key}: not a mapping"));
            };
            for (k, v) in tls {
                let Some(name) = k.as_str() else {
                    return Err(format!("{key}: a key is not a string"));
                };
                let flag = match (prefix, name) {
                    ("", "crl-file") => "client-crl-file".to_string(),
                    (p, n) => format!("{p}{n}"),
                };
                if known(&flag) {
                    push(&flag, v)?;
                }
            }
            continue;
        }
        match key {
            // etcd's default; meaningless without a discovery service.
            "discovery-fallback" => continue,
            "discovery" | "discovery-srv" | "discovery-srv-name" | "discovery-proxy" => {
                if scalar(v)?.is_some() {
                    return Err(format!(
                        "{key}: keelson cannot bootstrap through discovery (use initial-cluster)"
                    ));
                }
                continue;
            }
            _ => {}
        }
        if known(key) {
            push(key, v)?;
        }
    }
    Ok(args)
}

/// The cipher suite names `--cipher-suites` takes: every name Go's
/// crypto/tls knows (etcd looks them up there) and the two older ChaCha20
/// names etcd also accepts. Which of them keelson can offer is
/// `server::tls`'s business (rustls has the ECDHE AEAD suites only).
pub const GO_CIPHER_SUITES: &[&str] = &[
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

/// An origin in `--cors`: etcd parses each as a URL with an http(s) (or
/// unix) scheme, a host:port and no path.
fn check_origin(origin: &str) -> Result<(), String> {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Err(format!(
            "URL scheme must be http, https, unix, or unixs: {origin}"
        ));
    };
    if !matches!(scheme, "http" | "https" | "unix" | "unixs") {
        return Err(format!(
            "URL scheme must be http, https, unix, or unixs: {origin}"
        ));
    }
    if rest.contains('/') {
        return Err(format!("URL must not contain a path: {origin}"));
    }
    let port_ok = rest
        .rsplit_once(':')
        .map(|(host, port)| !host.is_empty() && port.chars().all(|c| c.is_ascii_digit()))
        .unwrap_or(false);
    if !port_ok {
        return Err(format!(
            "URL address does not have the form \"host:port\": {origin}"
        ));
    }
    Ok(())
}

/// Where log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOutput {
    Stderr,
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

/// What the auto-compactor keeps (etcd's compactor modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    Off,
    /// Compact away what is older than this (periodic mode).
    Periodic(Duration),
    /// Keep this many revisions (revision mode).
    Revision(i64),
}

/// etcd's reading of `--auto-compaction-mode` and `-retention`: a bare
/// number is hours (periodic) or revisions (revision), anything else a Go
/// duration (in revision mode, etcd then keeps its nanoseconds as a
/// revision count, and so does this); zero turns it off.
fn parse_auto_compaction(mode: &str, retention: &str) -> Result<AutoCompaction, String> {
    let periodic = match mode {
        "periodic" | "" => true,
        "revision" => false,
        _ => return Err(format!("unknown auto-compaction-mode {mode:?}")),
    };
    let span = match retention.trim().parse::<i64>() {
        Ok(n) if n >= 0 => {
            if periodic {
                Duration::from_secs(n as u64 * 3600)
            } else {
                return Ok(if n == 0 {
                    AutoCompaction::Off
                } else {
                    AutoCompaction::Revision(n)
                });
            }
        }
        _ => match parse_duration(retention) {
            Some(d) => d,
            None if retention
                .trim()
                .trim_end_matches(|c: char| c.is_ascii_alphabetic())
                == "0" =>
            {
                Duration::ZERO
            }
            None => {
                return Err(format!(
                    "error parsing CompactionRetention: time: invalid duration {retention:?}"
                ))
            }
        },
    };
    Ok(if span.is_zero() {
        AutoCompaction::Off
    } else if periodic {
        AutoCompaction::Periodic(span)
    } else {
        AutoCompaction::Revision(span.as_nanos().min(i64::MAX as u128) as i64)
    })
}

/// A Go duration (`10m0s`, `500ms`, `1h2m3.5s`); zero is refused.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[u..];
        total += num * scale;
    }
    (total > 0.0 && total < 1e9).then(|| Duration::from_secs_f64(total))
}

impl Config {
    fn validate(&self) -> Result<(), String> {
        for u in self
            .listen_client_urls
            .iter()
            .chain(&self.listen_peer_urls)
            .chain(&self.listen_metrics_urls)
        {
            parse_url(u)?;
        }
        let peers = self.initial_members()?;
        let peer_urls: Vec<&String> = self
            .listen_peer_urls
            .iter()
            .chain(&self.initial_advertise_peer_urls)
            .chain(peers.iter().map(|(_, u)| u))
            .collect();
        for u in &self.listen_metrics_urls {
            if is_tls_url(u) {
                return Err(format!(
                    "{u}: TLS on the metrics listener is not supported by keelson"
                ));
            }
        }
        let tls_peers = peer_urls.iter().filter(|u| is_tls_url(u)).count();
        if tls_peers > 0 && tls_peers < peer_urls.len() {
            return Err(
                "peer URLs mix http and https: keelson's members speak TLS to every peer or to none".into(),
            );
        }
        if tls_peers > 0 && !self.peer_auto_tls {
            if self.peer_cert_file.is_none() || self.peer_key_file.is_none() {
                return Err("https peer URLs need --peer-cert-file and --peer-key-file".into());
            }
            if self.peer_trusted_ca_file.is_none() {
                return Err(
                    "https peer URLs need --peer-trusted-ca-file (keelson verifies every peer's certificate against it)".into(),
                );
            }
        }
        if self.peer_client_cert_auth && self.peer_trusted_ca_file.is_none() && !self.peer_auto_tls
        {
            return Err("--peer-client-cert-auth needs --peer-trusted-ca-file".into());
        }
        if self.listen_client_urls.iter().any(|u| is_tls_url(u))
            && (self.cert_file.is_none() || self.key_file.is_none())
            && !self.auto_tls
        {
            return Err("https client URLs need --cert-file and --key-file".into());
        }
        if self.client_cert_auth && self.trusted_ca_file.is_none() && !self.auto_tls {
            return Err("--client-cert-auth needs --trusted-ca-file".into());
        }
        Ok(())
    }

    /// Whether members speak TLS to each other: the peer URLs are https
    /// (`validate` makes sure they all are, or none).
    pub fn peer_tls(&self) -> bool {
        self.listen_peer_urls
            .iter()
            .chain(&self.initial_advertise_peer_urls)
            .any(|u| is_tls_url(u))
            || self
                .initial_members()
                .map(|m| m.iter().any(|(_, u)| is_tls_url(u)))
                .unwrap_or(false)
    }

    /// `--initial-cluster` as (name, peer url) pairs.
    pub fn initial_members(&self) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        for part in self
            .initial_cluster
            .split(',')
            .filter(|p| !p.trim().is_empty())
        {
            let (n, u) = part
                .split_once('=')
                .ok_or_else(|| format!("--initial-cluster: {part:?} is not name=url"))?;
            out.push((n.trim().to_string(), u.trim().to_string()));
        }
        if out.is_empty() {
            return Err("--initial-cluster is empty".into());
        }
        Ok(out)
    }
}

/// Whether a URL asks for TLS.
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("https://")
}

/// Turns `http://host:port` or `https://host:port` into socket addresses
/// (which URLs may be https is `Config::validate`'s business).
pub fn parse_url(url: &str) -> Result<Vec<SocketAddr>, String> {
    let rest = if let Some(r) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    {
        r
    } else if url.starts_with("unix://") || url.starts_with("unixs://") {
        return Err(format!(
            "{url}: unix socket listeners are not supported by keelson"
        ));
    } else {
        return Err(format!("URL scheme must be http or https: {url}"));
    };
    let hostport = rest.trim_end_matches('/');
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{url}: no address"));
    }
    // localhost resolves to both ::1 and 127.0.0.1; etcd listens on the first
    // it resolves. Prefer IPv4 so that `localhost` clients always connect.
    let v4: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv4()).collect();
    Ok(if v4.is_empty() { addrs } else { vec![v4[0]] })
}

/// The host part of an http(s) URL, as a TLS peer's certificate must name
/// it: a DNS name, or an IP address (without an IPv6 literal's brackets).
pub fn url_host(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let hostport = rest.split('/').next()?;
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => hostport
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(hostport),
    };
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_host_is_the_name_a_certificate_must_have() {
        assert_eq!(
            url_host("https://10.0.0.1:2380").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            url_host("https://infra0.example.com:2380/").as_deref(),
            Some("infra0.example.com")
        );
        assert_eq!(url_host("https://[::1]:2380").as_deref(), Some("::1"));
        assert_eq!(url_host("http://localhost").as_deref(), Some("localhost"));
        assert_eq!(url_host("unix://x"), None);
    }

    fn p(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        match parse(args.iter().map(|s| s.to_string()), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })? {
            Parsed::Serve(c) => Ok(*c),
            _ => Err("not serve".into()),
        }
    }

    #[test]
    fn defaults_match_etcd() {
        let c = p(&[], &[]).unwrap();
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir, PathBuf::from("default.keelson"));
        assert_eq!(c.listen_client_urls, vec!["http://localhost:2379"]);
        assert_eq!(c.initial_cluster, "default=http://localhost:2380");
        assert_eq!(c.max_request_bytes, 1_572_864);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(c.election_timeout, Duration::from_millis(1000));
        assert_eq!(c.initial_cluster_token, "etcd-cluster");
    }

    #[test]
    fn flag_forms_and_env() {
        let c = p(
            &[
                "serve",
                "--name",
                "a",
                "-data-dir=/tmp/x",
                "--max-request-bytes=10",
            ],
            &[("ETCD_NAME", "ignored"), ("ETCD_SNAPSHOT_COUNT", "7")],
        )
        .unwrap();
        assert_eq!(c.name, "a");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.max_request_bytes, 10);
        assert_eq!(c.snapshot_count, 7);
    }

    /// Parses with `--config-file` naming a file holding `yaml`, plus
    /// `more` command-line flags.
    fn with_file(yaml: &str, more: &[&str]) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.conf.yml");
        std::fs::write(&path, yaml).unwrap();
        let mut args = vec!["--config-file".to_string(), path.display().to_string()];
        args.extend(more.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        p(&args, &[("ETCD_NAME", "from-env")])
    }

    #[test]
    fn a_config_file_is_read_as_etcd_reads_it() {
        let c = with_file(
            "# etcd.conf.yml\nname: 'infra1'\ndata-dir:\nsnapshot-count: 10000\n\
             heartbeat-interval: 100\nelection-timeout: 1000\n\
             listen-client-urls: https://127.0.0.1:2379\n\
             advertise-client-urls: https://127.0.0.1:2379\n\
             initial-cluster: infra1=http://localhost:2380\n\
             initial-cluster-state: 'existing'\nstrict-reconfig-check: false\n\
             enable-v2: true\ndiscovery:\ndiscovery-fallback: 'proxy'\n\
             client-transport-security:\n  cert-file: /c.crt\n  key-file: /c.key\n  \
             client-cert-auth: true\n  trusted-ca-file: /ca.crt\n  auto-tls: false\n\
             peer-transport-security:\n  cert-file:\n  client-cert-auth: false\n\
             log-outputs: [stderr]\nauto-compaction-mode: periodic\n\
             auto-compaction-retention: \"1\"\nsome-future-setting: 5\n",
            // Ignored with a config file, as etcd ignores them.
            &["--name", "from-flag"],
        )
        .unwrap();
        assert_eq!(c.name, "infra1");
        assert_eq!(c.data_dir, PathBuf::from("infra1.keelson"));
        assert_eq!(c.snapshot_count, 10000);
        assert_eq!(c.listen_client_urls, vec!["https://127.0.0.1:2379"]);
        assert_eq!(c.initial_cluster_state, "existing");
        assert!(!c.strict_reconfig_check && c.enable_v2);
        assert_eq!(c.cert_file, Some(PathBuf::from("/c.crt")));
        assert_eq!(c.trusted_ca_file, Some(PathBuf::from("/ca.crt")));
        assert!(c.client_cert_auth && !c.peer_client_cert_auth);
        assert_eq!(c.peer_cert_file, None);
        // An empty file is etcd's defaults.
        assert_eq!(with_file("", &[]).unwrap().name, "default");
        for (yaml, says) in [
            ("discovery: https://discovery.etcd.io/x\n", "discovery"),
            ("name: [a, {b: c}]\n", "name"),
            ("- a\n- b\n", "not a mapping"),
            ("name: 'unterminated\n", "--config-file"),
            ("snapshot-count: many\n", "snapshot-count"),
        ] {
            let e = with_file(yaml, &[]).unwrap_err();
            assert!(e.contains(says), "{yaml:?}: {e}");
        }
        assert!(p(&["--config-file", "/no/such/file"], &[])
            .unwrap_err()
            .contains("/no/such/file"));
    }

    #[test]
    fn lease_checkpoints_are_off_by_default_and_every_5_minutes_when_on() {
        let lc = |args: &[&str]| p(args, &[]).map(|c| c.lease_checkpoint);
        assert_eq!(lc(&[]), Ok(None));
        assert_eq!(lc(&["--lease-checkpoint-interval=2s"]), Ok(None));
        assert_eq!(
            lc(&["--experimental-enable-lease-checkpoint"]),
            Ok(Some(Duration::from_secs(300)))
        );
        assert_eq!(
            lc(&[
                "--experimental-enable-lease-checkpoint=true",
                "--lease-checkpoint-interval",
                "1m30s"
            ]),
            Ok(Some(Duration::from_secs(90)))
        );
        assert!(lc(&["--lease-checkpoint-interval=10ms"]).is_err());
        assert!(lc(&["--lease-checkpoint-interval=soon"]).is_err());
        assert!(lc(&["--experimental-enable-lease-checkpoint=maybe"]).is_err());
    }

    #[test]
    fn quota_defaults_to_2_gib_and_a_negative_one_turns_it_off() {
        let q = |args: &[&str]| p(args, &[]).unwrap().quota_bytes();
        assert_eq!(q(&[]), Some(2 << 30));
        assert_eq!(q(&["--quota-backend-bytes", "0"]), Some(2 << 30));
        assert_eq!(q(&["--quota-backend-bytes", "65536"]), Some(65536));
        assert_eq!(q(&["--quota-backend-bytes", "-1"]), None);
        assert_eq!(q(&["--quota-backend-bytes=-5"]), None);
        assert!(p(&["--quota-backend-bytes", "x"], &[]).is_err());
    }

    #[test]
    fn auto_compaction_flags_read_as_etcd_reads_them() {
        let ac = |args: &[&str]| p(args, &[]).map(|c| c.auto_compaction);
        assert_eq!(ac(&[]), Ok(AutoCompaction::Off));
        assert_eq!(
            ac(&["--auto-compaction-retention", "1"]),
            Ok(AutoCompaction::Periodic(Duration::from_secs(3600)))
        );
        assert_eq!(
            ac(&[
                "--auto-compaction-retention=30m",
                "--auto-compaction-mode=periodic"
            ]),
            Ok(AutoCompaction::Periodic(Duration::from_secs(1800)))
        );
        assert_eq!(
            ac(&[
                "--auto-compaction-mode",
                "revision",
                "--auto-compaction-retention",
                "1000"
            ]),
            Ok(AutoCompaction::Revision(1000))
        );
        assert_eq!(
            ac(&[
                "--auto-compaction-mode",
                "revision",
                "--auto-compaction-retention",
                "0"
            ]),
            Ok(AutoCompaction::Off)
        );
        assert_eq!(
            ac(&["--auto-compaction-retention", "0s"]),
            Ok(AutoCompaction::Off)
        );
        assert!(ac(&[
            "--auto-compaction-mode",
            "daily",
            "--auto-compaction-retention",
            "1"
        ])
        .unwrap_err()
        .contains("unknown auto-compaction-mode"));
        assert!(ac(&["--auto-compaction-retention", "soon"])
            .unwrap_err()
            .contains("error parsing CompactionRetention"));
    }

    #[test]
    fn etcd_flags_keelson_takes_as_etcd_or_refuses_plainly() {
        let d = p(&[], &[]).unwrap();
        assert!(d.pre_vote && d.grpc_gateway && !d.unsafe_no_fsync);
        assert!(d.initial_election_tick_advance);
        assert!(p(&["--unsafe-no-fsync"], &[]).unwrap().unsafe_no_fsync);
        assert_eq!(d.max_concurrent_streams, 4096);
        let c = p(
            &[
                "--pre-vote=false",
                "--enable-grpc-gateway=false",
                "--initial-election-tick-advance=false",
                "--max-concurrent-streams",
                "10",
            ],
            &[],
        )
        .unwrap();
        assert!(!c.pre_vote && !c.grpc_gateway && !c.initial_election_tick_advance);
        assert_eq!(c.max_concurrent_streams, 10);
        let c = p(
            &[
                "--max-txn-ops",
                "3",
                "--logger",
                "zap",
                "--log-outputs",
                "stdout",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.max_txn_ops, 3);
        assert_eq!(c.log_output, LogOutput::Stdout);
        assert_eq!(p(&[], &[]).unwrap().max_txn_ops, 128);
        assert_eq!(p(&[], &[]).unwrap().log_output, LogOutput::Stderr);
        let c = p(
            &["--log-outputs=/tmp/x.log", "--debug", "--enable-v2=false"],
            &[],
        )
        .unwrap();
        assert_eq!(c.log_output, LogOutput::File(PathBuf::from("/tmp/x.log")));
        assert_eq!(c.log_level, 3);
        assert!(p(&["--auth-token", "simple"], &[]).is_ok());
        assert!(p(
            &[
                "--force-new-cluster=1",
                "--experimental-initial-corrupt-check=true",
                "--max-snapshots=0",
                "--max-wals",
                "7",
            ],
            &[],
        )
        .is_ok());
        let h = Duration::from_secs(3600);
        assert_eq!(d.grpc_keepalive, Some((2 * h, Duration::from_secs(20))));
        let c = p(
            &[
                "--grpc-keepalive-interval=1m30s",
                "--grpc-keepalive-timeout",
                "500ms",
                "--grpc-keepalive-min-time=1s",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            c.grpc_keepalive,
            Some((Duration::from_secs(90), Duration::from_millis(500)))
        );
        // grpc-go pings at most once a second; 0 turns the pings off.
        let c = p(&["--grpc-keepalive-interval=10ms"], &[]).unwrap();
        assert_eq!(c.grpc_keepalive.unwrap().0, Duration::from_secs(1));
        let c = p(&[], &[("ETCD_GRPC_KEEPALIVE_TIMEOUT", "0")]).unwrap();
        assert_eq!(c.grpc_keepalive, None);
        assert_eq!(p(&[], &[]).unwrap().corrupt_check_every, None);
        assert_eq!(
            p(&["--experimental-corrupt-check-time=2m"], &[])
                .unwrap()
                .corrupt_check_every,
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            p(&["--experimental-corrupt-check-time", "0"], &[])
                .unwrap()
                .corrupt_check_every,
            None
        );
        // etcd's Procfile starts its members with --enable-pprof.
        assert!(p(&["--enable-pprof"], &[]).unwrap().enable_pprof);
        assert!(!p(&[], &[]).unwrap().enable_pprof);
        assert!(p(&["--enable-pprof=maybe"], &[])
            .unwrap_err()
            .contains("-enable-pprof"));
        assert!(p(&["--grpc-keepalive-interval=soon"], &[])
            .unwrap_err()
            .contains("-grpc-keepalive-interval"));
        for (args, says) in [
            (&["--max-wals=-1"][..], "-max-wals"),
            (
                &["--auth-token", "jwt,pub-key=/nonexistent"][..],
                "pub-key /nonexistent",
            ),
            (
                &["--auth-token", "jwt,sign-method=RS256"][..],
                "missing key",
            ),
            (&["--auth-token", "paseto"][..], "unknown token type"),
            (&["--logger", "glog"][..], "unknown logger"),
            (&["--log-outputs", "stderr,/tmp/x"][..], "one output"),
            (&["--max-txn-ops", "0"][..], "at least 1"),
        ] {
            let e = p(args, &[]).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    fn unknown_etcd_variables_are_told_apart() {
        assert!(!unrecognized_env("ETCD_NAME"));
        assert!(!unrecognized_env("ETCD_CIPHER_SUITES"));
        assert!(!unrecognized_env("ETCDCTL_API"));
        assert!(!unrecognized_env("PATH"));
        assert!(unrecognized_env("ETCD_DISCOVERY_SRV"));
        assert!(unrecognized_env("ETCD_NAMES"));
    }

    #[test]
    fn the_rest_of_etcd_3_4s_flags_are_taken_or_refused_plainly() {
        // Taken as etcd parses them, with no effect (README).
        let c = p(
            &[
                "--backend-batch-interval=10ms",
                "--backend-batch-limit",
                "100",
                "--experimental-backend-bbolt-freelist-type=array",
                "--experimental-compaction-batch-limit=1000",
                "--experimental-warning-apply-duration=200ms",
                "--bcrypt-cost",
                "12",
                "--log-package-levels",
                "etcdserver=DEBUG",
                "--metrics=extensive",
                "--experimental-enable-lease-checkpoint",
                "--experimental-peer-skip-client-san-verification",
                "--auto-tls=false",
                "--peer-auto-tls=false",
                "--proxy=off",
                "--proxy-dial-timeout=1000",
            ],
            &[("ETCD_PROXY_READ_TIMEOUT", "0")],
        )
        .unwrap();
        // Defaults: every origin and host; no TLS refinements.
        assert_eq!(c.cors, vec!["*"]);
        assert_eq!(c.host_whitelist, vec!["*"]);
        assert!(c.cipher_suites.is_empty() && c.peer_cert_allowed_cn.is_none());
        let c = p(
            &[
                "--cors",
                "http://a.example:80,https://b.example:8443",
                "--host-whitelist=localhost,example.com",
                "--cipher-suites",
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
                "--peer-cert-allowed-cn=member",
                "--client-cert-allowed-hostname=client.example",
                "--client-crl-file=/x/crl.pem",
            ],
            &[("ETCD_PEER_CRL_FILE", "/y/crl.pem")],
        )
        .unwrap();
        assert_eq!(
            c.cors,
            vec!["http://a.example:80", "https://b.example:8443"]
        );
        assert_eq!(c.host_whitelist, vec!["localhost", "example.com"]);
        assert_eq!(c.cipher_suites.len(), 2);
        assert_eq!(c.peer_cert_allowed_cn.as_deref(), Some("member"));
        assert_eq!(
            c.client_cert_allowed_hostname.as_deref(),
            Some("client.example")
        );
        assert_eq!(c.client_crl_file, Some(PathBuf::from("/x/crl.pem")));
        assert_eq!(c.peer_crl_file, Some(PathBuf::from("/y/crl.pem")));
        for (args, says) in [
            (
                &["--cipher-suites", "TLS_FAST"][..],
                "unexpected TLS cipher suite \"TLS_FAST\"",
            ),
            (&["--cors", "example.com"][..], "URL scheme must be"),
            (&["--cors", "http://example.com"][..], "host:port"),
            (
                &["--cors", "http://example.com:80/x"][..],
                "must not contain a path",
            ),
            (
                &["--peer-cert-allowed-cn=a", "--peer-cert-allowed-hostname=b"][..],
                "mutually exclusive",
            ),
            (&["--auto-tls=maybe"][..], "-auto-tls"),
            (&["--proxy=on"][..], "no v2 proxy"),
            (&["--proxy=sideways"][..], "valid values are"),
            (&["--backend-batch-limit=many"][..], "-backend-batch-limit"),
            (
                &["--backend-batch-interval=soon"][..],
                "-backend-batch-interval",
            ),
            (
                &["--initial-election-tick-advance=maybe"][..],
                "invalid boolean",
            ),
            (
                &["--discovery-srv", "example.com"][..],
                "not defined: -discovery-srv",
            ),
        ] {
            let e = p(args, &[]).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    fn auto_tls_stands_in_for_the_certificate_files() {
        let https = ["--listen-client-urls", "https://127.0.0.1:2379"];
        let e = p(&https, &[]).unwrap_err();
        assert!(e.contains("--cert-file"), "{e}");
        let c = p(&[https[0], https[1], "--auto-tls"], &[]).unwrap();
        assert!(c.auto_tls && c.cert_file.is_none());
        // etcd drops --client-cert-auth then (its TLS settings are replaced).
        assert!(p(
            &[https[0], https[1], "--auto-tls", "--client-cert-auth"],
            &[]
        )
        .is_ok());
        let peers = [
            "--listen-peer-urls",
            "https://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "https://127.0.0.1:2380",
            "--initial-cluster",
            "default=https://127.0.0.1:2380",
        ];
        let e = p(&peers, &[]).unwrap_err();
        assert!(e.contains("--peer-cert-file"), "{e}");
        let mut with = peers.to_vec();
        with.push("--peer-auto-tls");
        let c = p(&with, &[("ETCD_AUTO_TLS", "true")]).unwrap();
        assert!(c.peer_auto_tls && c.auto_tls);
    }

    #[test]
    fn max_request_bytes_is_bounded() {
        let limit = MAX_REQUEST_BYTES_LIMIT.to_string();
        assert!(p(&["--max-request-bytes", &limit], &[]).is_ok());
        let over = (MAX_REQUEST_BYTES_LIMIT + 1).to_string();
        let e = p(&["--max-request-bytes", &over], &[]).unwrap_err();
        assert!(e.contains("--max-request-bytes"), "{e}");
        const _: () = assert!(
            (MAX_REQUEST_BYTES_LIMIT as usize) <= crate::store::segment::RECORD_BYTES_MAX / 2
        );
    }

    #[test]
    fn a_new_data_dir_gets_one_shard_per_core_or_one_on_two_cores() {
        let shards = |args: &[&str]| p(args, &[]).unwrap().new_data_dir_shards();
        assert_eq!(shards(&["--cores", "1"]), 1);
        assert_eq!(shards(&["--cores", "2"]), 1);
        assert_eq!(shards(&["--cores", "3"]), 3);
        assert_eq!(shards(&["--cores", "8"]), 8);
        assert_eq!(shards(&["--cores", "2", "--shards", "4"]), 4);
        assert_eq!(shards(&["--cores", "8", "--shards", "1"]), 1);
    }

    #[test]
    fn boolean_flags() {
        assert!(p(&[], &[]).unwrap().strict_reconfig_check);
        assert!(
            !p(&["--strict-reconfig-check=false"], &[])
                .unwrap()
                .strict_reconfig_check
        );
        assert!(
            p(&["--strict-reconfig-check", "--name", "x"], &[])
                .unwrap()
                .strict_reconfig_check
        );
    }

    #[test]
    fn errors() {
        let cases: &[(&[&str], &str)] = &[
            (&["--bogus", "1"], "flag provided but not defined: -bogus"),
            (&["--name"], "flag needs an argument: -name"),
            (
                &["--snapshot-count", "x"],
                "invalid value \"x\" for flag -snapshot-count",
            ),
            (&["--initial-cluster-state", "old"], "valid values are"),
            (&["--strict-reconfig-check=maybe"], "invalid boolean value"),
            (&["--heartbeat-interval", "500"], "at least as 5 times"),
            (
                &["--listen-client-urls", "https://127.0.0.1:1"],
                "--cert-file and --key-file",
            ),
            (
                &["--listen-peer-urls", "https://127.0.0.1:1"],
                "every peer or to none",
            ),
            (
                &[
                    "--listen-peer-urls",
                    "https://127.0.0.1:1",
                    "--initial-advertise-peer-urls",
                    "https://127.0.0.1:1",
                    "--initial-cluster",
                    "default=https://127.0.0.1:1",
                ],
                "--peer-cert-file and --peer-key-file",
            ),
            (
                &[
                    "--listen-peer-urls",
                    "https://127.0.0.1:1",
                    "--initial-advertise-peer-urls",
                    "https://127.0.0.1:1",
                    "--initial-cluster",
                    "default=https://127.0.0.1:1",
                    "--peer-cert-file",
                    "c",
                    "--peer-key-file",
                    "k",
                ],
                "--peer-trusted-ca-file",
            ),
            (
                &["--peer-client-cert-auth"],
                "--peer-client-cert-auth needs --peer-trusted-ca-file",
            ),
            (
                &["--listen-metrics-urls", "https://127.0.0.1:1"],
                "metrics listener",
            ),
        ];
        for (args, want) in cases {
            let err = p(args, &[]).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }
}
