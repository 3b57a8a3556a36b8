//! `keelson gateway start`: etcd's L4 gateway, a TCP proxy in front of a
//! cluster's client endpoints (etcd's `etcdmain/gateway.go` and
//! `proxy/tcpproxy`). Each client connection goes to the next endpoint in
//! turn that is not marked down; an endpoint that refuses a dial is marked
//! down until a dial every `--retry-delay` (default 1m) succeeds again.
//! Bytes are copied both ways unchanged, so TLS and gRPC pass through.
//!
//! It is a side process, not a member: plain threads (one per direction of
//! each connection) that block on their sockets, so nothing spins.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub listen_addr: String,
    /// host:port, schemes stripped.
    pub endpoints: Vec<String>,
    pub retry_delay: Duration,
}

pub const USAGE: &str = "Usage: keelson gateway start [flags]

Flags (as etcd's gateway):
  --listen-addr ADDR     listen address (default 127.0.0.1:23790)
  --endpoints LIST       comma separated etcd cluster endpoints (default 127.0.0.1:2379)
  --retry-delay DUR      duration of delay before retrying failed endpoints (default 1m0s)
  --trusted-ca-file, --insecure-discovery
                         accepted; used by etcd only with --discovery-srv
  --discovery-srv, --discovery-srv-name
                         not supported (DNS SRV discovery)
";

/// What `keelson gateway ARGS` asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Start(GatewayConfig),
    Help,
}

/// Parses the arguments after `gateway` (flags may come before or after
/// `start`, as cobra takes them).
pub fn parse(args: &[String]) -> Result<Command, String> {
    let mut cfg = GatewayConfig {
        listen_addr: "127.0.0.1:23790".into(),
        endpoints: Vec::new(),
        retry_delay: Duration::from_secs(60),
    };
    let mut sub: Option<&str> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(flag) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
            if sub.is_some() {
                return Err(format!("unexpected argument {a:?}"));
            }
            sub = Some(a.as_str());
            continue;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        if name == "h" || name == "help" {
            return Ok(Command::Help);
        }
        if name == "insecure-discovery" {
            match inline.as_deref() {
                None | Some("true") | Some("false") => continue,
                Some(v) => return Err(format!("invalid argument {v:?} for \"--{name}\" flag")),
            }
        }
        let known = [
            "listen-addr",
            "endpoints",
            "retry-delay",
            "trusted-ca-file",
            "discovery-srv",
            "discovery-srv-name",
        ];
        if !known.contains(&name) {
            return Err(format!("unknown flag: --{name}"));
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("flag needs an argument: --{name}"))?,
        };
        match name {
            "listen-addr" => cfg.listen_addr = value,
            "endpoints" => cfg.endpoints.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(strip_scheme),
            ),
            "retry-delay" => {
                cfg.retry_delay = crate::config::parse_duration(&value).ok_or_else(|| {
                    format!("invalid argument {value:?} for \"--retry-delay\" flag")
                })?
            }
            "discovery-srv" | "discovery-srv-name" if !value.is_empty() => {
                return Err(format!(
                "--{name}: DNS SRV discovery is not supported; list the members with --endpoints"
            ))
            }
            _ => {}
        }
    }
    match sub {
        None => Ok(Command::Help),
        Some("start") => {
            if cfg.endpoints.is_empty() {
                cfg.endpoints.push("127.0.0.1:2379".into());
            }
            for ep in &cfg.endpoints {
                split_host_port(ep).ok_or_else(|| format!("error parsing endpoint {ep:?}"))?;
            }
            split_host_port(&cfg.listen_addr)
                .ok_or_else(|| format!("failed to validate listen address: {}", cfg.listen_addr))?;
            Ok(Command::Start(cfg))
        }
        Some(other) => Err(format!("unknown command {other:?} for \"keelson gateway\"")),
    }
}

/// `http://host:port` → `host:port` (the gateway proxies TCP).
fn strip_scheme(ep: &str) -> String {
    match ep.split_once("://") {
        Some((_, rest)) if !rest.is_empty() => rest.trim_end_matches('/').to_string(),
        _ => ep.to_string(),
    }
}

/// (host, port) of `host:port` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port.parse().ok()?))
}

struct Remote {
    addr: String,
    down: bool,
}

struct Remotes {
    list: Vec<Remote>,
    /// Round robin position.
    picks: usize,
}

impl Remotes {
    /// The next endpoint not marked down (etcd's pick for endpoints of
    /// equal priority and no weight).
    fn pick(&mut self) -> Option<usize> {
        let n = self.list.len();
        for _ in 0..n {
            let i = self.picks % n;
            self.picks += 1;
            if !self.list[i].down {
                return Some(i);
            }
        }
        None
    }
}

/// Binds, says it is ready, and proxies until the process ends.
pub fn run(cfg: GatewayConfig) -> Result<(), String> {
    check_not_self(&cfg)?;
    let listener = TcpListener::bind(&cfg.listen_addr)
        .map_err(|e| format!("listen tcp {}: {e}", cfg.listen_addr))?;
    let remotes = Arc::new(Mutex::new(Remotes {
        list: cfg
            .endpoints
            .iter()
            .map(|a| Remote {
                addr: a.clone(),
                down: false,
            })
            .collect(),
        picks: 0,
    }));
    crate::info!("ready to proxy client requests to {:?}", cfg.endpoints);
    {
        let remotes = remotes.clone();
        let every = cfg.retry_delay;
        std::thread::Builder::new()
            .name("gateway-monitor".into())
            .spawn(move || monitor(&remotes, every))
            .map_err(|e| e.to_string())?;
    }
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait, don't spin.
                crate::warn!("gateway: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let remotes = remotes.clone();
        let every = cfg.retry_delay;
        if let Err(e) = std::thread::Builder::new()
            .name("gateway-conn".into())
            .spawn(move || serve(conn, &remotes, every))
        {
            crate::warn!("gateway: cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

/// etcd refuses an endpoint that resolves to the listen address itself
/// (on the same port): the gateway would proxy to itself.
fn check_not_self(cfg: &GatewayConfig) -> Result<(), String> {
    let (lhost, lport) = split_host_port(&cfg.listen_addr)
        .ok_or_else(|| format!("failed to validate listen address: {}", cfg.listen_addr))?;
    let mine: Vec<SocketAddr> = (lhost, lport)
        .to_socket_addrs()
        .map_err(|_| format!("failed to resolve listen host: {lhost}"))?
        .collect();
    for ep in &cfg.endpoints {
        let (host, port) =
            split_host_port(ep).ok_or_else(|| format!("error parsing endpoint {ep:?}"))?;
        if port != lport {
            continue;
        }
        let theirs = (host, port)
            .to_socket_addrs()
            .map_err(|_| format!("failed to resolve endpoint host: {host}"))?;
        for a in theirs {
            if mine.iter().any(|m| m.ip() == a.ip()) {
                return Err(format!(
                    "SRV or endpoint ({host}:{port}->{}:{port}) should not resolve to the gateway listen addr ({})",
                    a.ip(),
                    cfg.listen_addr
                ));
            }
        }
    }
    Ok(())
}

fn serve(client: TcpStream, remotes: &Mutex<Remotes>, every: Duration) {
    let server = loop {
        let picked = {
            let mut r = remotes.lock().unwrap_or_else(|p| p.into_inner());
            r.pick().map(|i| (i, r.list[i].addr.clone()))
        };
        let Some((i, addr)) = picked else {
            return; // every endpoint is down: the client's connection closes
        };
        match TcpStream::connect(&addr) {
            Ok(s) => break s,
            Err(e) => {
                remotes.lock().unwrap_or_else(|p| p.into_inner()).list[i].down = true;
                crate::warn!("deactivated endpoint [{addr}] due to {e} for {every:?}");
            }
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let back = std::thread::Builder::new()
        .name("gateway-conn".into())
        .spawn(move || {
            let _ = io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(Shutdown::Both);
            let _ = s2.shutdown(Shutdown::Both);
        });
    let (mut c, mut s) = (client, server);
    let _ = io::copy(&mut c, &mut s);
    let _ = s.shutdown(Shutdown::Both);
    let _ = c.shutdown(Shutdown::Both);
    if let Ok(t) = back {
        let _ = t.join();
    }
}

/// Every `every`, dials each endpoint marked down; one that answers is up
/// again.
fn monitor(remotes: &Mutex<Remotes>, every: Duration) {
    loop {
        std::thread::sleep(every);
        let down: Vec<(usize, String)> = {
            let r = remotes.lock().unwrap_or_else(|p| p.into_inner());
            r.list
                .iter()
                .enumerate()
                .filter(|(_, x)| x.down)
                .map(|(i, x)| (i, x.addr.clone()))
                .collect()
        };
        for (i, addr) in down {
            match TcpStream::connect(&addr) {
                Ok(_) => {
                    remotes.lock().unwrap_or_else(|p| p.into_inner()).list[i].down = false;
                    crate::info!("activated {addr}");
                }
                Err(e) => crate::warn!(
                    "failed to activate endpoint [{addr}] due to {e} (stay inactive for another {every:?})"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_parse_as_etcds_gateway_takes_them() {
        let Ok(Command::Start(c)) = p(&["start"]) else {
            panic!()
        };
        assert_eq!(c.listen_addr, "127.0.0.1:23790");
        assert_eq!(c.endpoints, vec!["127.0.0.1:2379"]);
        assert_eq!(c.retry_delay, Duration::from_secs(60));
        let Ok(Command::Start(c)) = p(&[
            "--endpoints=http://127.0.0.1:1,https://[::1]:2/",
            "start",
            "--listen-addr",
            "127.0.0.1:9",
            "--retry-delay=5s",
            "--endpoints",
            "localhost:3",
            "--insecure-discovery",
        ]) else {
            panic!()
        };
        assert_eq!(c.endpoints, vec!["127.0.0.1:1", "[::1]:2", "localhost:3"]);
        assert_eq!(c.listen_addr, "127.0.0.1:9");
        assert_eq!(c.retry_delay, Duration::from_secs(5));
        assert_eq!(p(&[]), Ok(Command::Help));
        assert_eq!(p(&["start", "-h"]), Ok(Command::Help));
        for (args, err) in [
            (
                &["start", "--endpoints=nope"][..],
                "error parsing endpoint \"nope\"",
            ),
            (
                &["start", "--listen-addr=x"][..],
                "failed to validate listen address: x",
            ),
            (
                &["start", "--retry-delay=soon"][..],
                "invalid argument \"soon\"",
            ),
            (&["start", "--bogus=1"][..], "unknown flag: --bogus"),
            (&["stop"][..], "unknown command \"stop\""),
            (&["start", "--endpoints"][..], "flag needs an argument"),
            (
                &["start", "--discovery-srv=example.com"][..],
                "not supported",
            ),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.contains(err), "{args:?}: {e}");
        }
    }

    #[test]
    fn an_endpoint_that_is_the_listen_address_is_refused() {
        let cfg = GatewayConfig {
            listen_addr: "127.0.0.1:23790".into(),
            endpoints: vec!["127.0.0.1:2379".into(), "127.0.0.1:23790".into()],
            retry_delay: Duration::from_secs(60),
        };
        let e = check_not_self(&cfg).unwrap_err();
        assert!(
            e.contains("should not resolve to the gateway listen addr"),
            "{e}"
        );
    }

    #[test]
    fn pick_goes_round_the_endpoints_that_are_up() {
        let mut r = Remotes {
            list: ["a", "b", "c"]
                .iter()
                .map(|a| Remote {
                    addr: a.to_string(),
                    down: false,
                })
                .collect(),
            picks: 0,
        };
        assert_eq!(
            (r.pick(), r.pick(), r.pick(), r.pick()),
            (Some(0), Some(1), Some(2), Some(0))
        );
        r.list[1].down = true;
        assert_eq!((r.pick(), r.pick()), (Some(2), Some(0)));
        for x in r.list.iter_mut() {
            x.down = true;
        }
        assert_eq!(r.pick(), None);
    }
}
