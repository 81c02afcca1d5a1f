//! Runs `bench statefetch` the way zzctl will: this executable is also the
//! peer process (hidden first argument `__statefetch-serve`).
//!
//! `cargo run --release -p zz-statefetch --example statefetch-bench -- [STATE_MIB] [DIRTY_PAGES]`

use zz_statefetch::bench::{self, PeerCommand};

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("__statefetch-serve") {
        args.next();
        if let Err(e) = bench::serve_main(args) {
            eprintln!("statefetch peer: {e}");
            std::process::exit(1);
        }
        return;
    }
    let state_mib = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let dirty_pages = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let peer = PeerCommand::current_exe(&["__statefetch-serve"]).expect("current exe");
    match bench::run(state_mib, dirty_pages, &peer) {
        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
        Err(e) => {
            eprintln!("bench statefetch: {e}");
            std::process::exit(1);
        }
    }
}
