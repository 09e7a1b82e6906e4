//! The `imgw` binary: gateway and tools (SPEC 7).

fn main() {
    eprintln!(
        "imgw {}: the gateway lands with the gateway issue",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
