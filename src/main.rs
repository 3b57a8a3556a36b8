use keelson::config::{self, Parsed};

// Many small allocations cross cores (requests, responses, entries):
// mimalloc's per-thread heaps free them without glibc's consolidation work.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = std::env::args().skip(1);
    match config::parse(args, |k| std::env::var(k).ok()) {
        Ok(Parsed::Help) => {
            print!("{}", config::usage());
        }
        Ok(Parsed::Version) => {
            println!("keelson Version: {}", env!("CARGO_PKG_VERSION"));
            println!("API Version: {}", keelson::ETCD_VERSION);
        }
        Ok(Parsed::Serve(cfg)) => {
            keelson::logging::set_level(cfg.log_level);
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
