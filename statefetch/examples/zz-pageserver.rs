//! The benchmark's peer process on its own: builds a state and serves it.
//!
//! `zz-pageserver [--state-mib N] [--dir PATH] [--unix]`; prints a READY line
//! and serves until stdin closes. Same entry point as `zzctl __statefetch-serve`.

fn main() {
    if let Err(e) = zz_statefetch::bench::serve_main(std::env::args().skip(1)) {
        eprintln!("zz-pageserver: {e}");
        std::process::exit(1);
    }
}
