//! `loadgen`: the bundled load generator. Placeholder member of the workspace until the loadgen
//! issue lands; it exits with a clear message instead of pretending to generate load.

fn main() {
    eprintln!(
        "loadgen {}: not implemented yet (see the loadgen issue); codec {} is available",
        env!("CARGO_PKG_VERSION"),
        imgw::codec::CodecId::Json.name()
    );
    std::process::exit(2);
}
