//! Builds the kernel programs (`../ebpf`, its own cargo workspace) with the nightly toolchain
//! and `bpf-linker` through `aya-build`, and leaves the object in `OUT_DIR` for
//! `include_bytes_aligned!`. Run `scripts/setup-datapath.sh` once to install the toolchain.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../ebpf").canonicalize()?;
    let common_dir = manifest.join("../common").canonicalize()?;
    println!("cargo:rerun-if-changed={}", common_dir.display());
    // aya-build runs `cargo build --package …` in the current directory; the eBPF crate is a
    // workspace of its own, so run it from there (the root workspace does not list it).
    env::set_current_dir(&ebpf_dir)?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tollgate-datapath-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed ({e:#}); is the toolchain installed? \
             run scripts/setup-datapath.sh"
        )
    })
}
