//! Compiles the eBPF programs with the nightly toolchain (through aya-build and
//! bpf-linker) and leaves the object in OUT_DIR, where the agent embeds it.

fn main() -> anyhow::Result<()> {
    let programs = aya_build::Package {
        name: "podsteer-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/programs"),
        ..Default::default()
    };
    aya_build::build_ebpf([programs], aya_build::Toolchain::default())
}
