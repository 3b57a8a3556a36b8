//! Compiles every .proto under proto/ with protox (pure Rust, no protoc on
//! the machine) and generates prost message types into OUT_DIR, and for
//! etcd's packages serde impls of the proto3 JSON mapping (pbjson-build) for
//! the HTTP/JSON gateway, in `<package>.serde.rs`.

use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().map(|e| e == "proto").unwrap_or(false) {
            out.push(p);
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=proto");
    let mut files = Vec::new();
    collect(Path::new("proto"), &mut files);
    let fds = protox::compile(&files, ["proto"]).expect("proto files compile");
    let encoded = prost::Message::encode_to_vec(&fds);
    prost_build::Config::new()
        // A put's key and value are slices of the request (or log entry)
        // they were decoded from, not copies (decoded from `Bytes`).
        .bytes([".etcdserverpb.PutRequest"])
        .compile_fds(fds)
        .expect("prost code generation");
    // etcd's gateway marshals with `OrigName: true` and without
    // `EmitDefaults`, and ignores fields it does not know; both field-name
    // styles are accepted on input.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)
        .expect("descriptors for pbjson")
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[
            ".etcdserverpb",
            ".mvccpb",
            ".authpb",
            ".v3lockpb",
            ".v3electionpb",
        ])
        .expect("pbjson code generation");
}
