use keelson::config::{self, Parsed};

// Many small allocations cross cores (requests, responses, entries):
// mimalloc's per-thread heaps free them without glibc's consolidation work
// (`keelson::alloc`: called as `System` calls malloc).
#[global_allocator]
static GLOBAL: keelson::alloc::Mimalloc = keelson::alloc::Mimalloc;

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(|a| a == "snapshot").unwrap_or(false) {
        std::process::exit(snapshot_cmd(&all[1..]));
    }
    if all.first().map(|a| a == "gateway").unwrap_or(false) {
        std::process::exit(gateway_cmd(&all[1..]));
    }
    let args = all.into_iter();
    match config::parse(args, |k| std::env::var(k).ok()) {
        Ok(Parsed::Help) => {
            print!("{}", config::usage());
        }
        Ok(Parsed::Version) => {
            println!("keelson Version: {}", env!("CARGO_PKG_VERSION"));
            println!("API Version: {}", keelson::ETCD_VERSION);
        }
        Ok(Parsed::Serve(cfg)) => {
            if let Err(e) = keelson::logging::redirect(&cfg.log_output) {
                eprintln!("keelson: {e}");
                std::process::exit(1);
            }
            keelson::logging::set_level(cfg.log_level);
            // As etcd: an ETCD_* variable no flag reads is named, not fatal.
            let mut unknown: Vec<String> = std::env::vars()
                .map(|(k, _)| k)
                .filter(|k| config::unrecognized_env(k))
                .collect();
            unknown.sort();
            for k in unknown {
                keelson::warn!("unrecognized environment variable {k}");
            }
            if let Err(e) = keelson::server::run(*cfg) {
                keelson::error!("{e}");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("keelson: {e}");
            eprintln!("Run 'keelson --help' for usage.");
            std::process::exit(2);
        }
    }
}

/// `keelson gateway start [flags]`: etcd's L4 gateway (`keelson::tcp_gateway`).
fn gateway_cmd(args: &[String]) -> i32 {
    use keelson::tcp_gateway::{self as gateway, Command};
    match gateway::parse(args) {
        Ok(Command::Help) => {
            print!("{}", gateway::USAGE);
            0
        }
        Ok(Command::Start(cfg)) => match gateway::run(cfg) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("keelson gateway: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("keelson gateway: {e}");
            eprintln!("Run 'keelson gateway --help' for usage.");
            2
        }
    }
}

/// `keelson snapshot restore FILE [--skip-hash-check] [server flags]` and
/// `keelson snapshot status FILE`.
fn snapshot_cmd(args: &[String]) -> i32 {
    let usage = "Usage: keelson snapshot restore FILE [--skip-hash-check] [--name, --data-dir, --initial-cluster, --initial-cluster-token, --initial-advertise-peer-urls, --shards ...]\n       keelson snapshot status FILE";
    let (Some(cmd), Some(file)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        return 2;
    };
    let path = std::path::Path::new(file);
    match cmd.as_str() {
        "status" => match keelson::restore::status(path) {
            Ok(s) => {
                println!("{s}");
                0
            }
            Err(e) => {
                eprintln!("Error: {e}");
                1
            }
        },
        "restore" => {
            let mut check = true;
            let rest: Vec<String> = args[2..]
                .iter()
                .filter(|a| {
                    let skip = a.trim_start_matches('-') == "skip-hash-check";
                    check &= !skip;
                    !skip
                })
                .cloned()
                .collect();
            let cfg = match config::parse(rest, |k| std::env::var(k).ok()) {
                Ok(Parsed::Serve(c)) => c,
                Ok(_) => {
                    eprintln!("{usage}");
                    return 2;
                }
                Err(e) => {
                    eprintln!("Error: {e}");
                    return 2;
                }
            };
            match keelson::restore::restore(path, &cfg, check) {
                Ok(s) => {
                    println!("{s}");
                    0
                }
                Err(e) => {
                    eprintln!("Error: {e}");
                    1
                }
            }
        }
        _ => {
            eprintln!("{usage}");
            2
        }
    }
}
