//! Merge and tar-entry cases found by trying real images (issue 12), each squashed by strata, loaded
//! into docker and compared with `docker pull` of the source; where docker refuses the source layer,
//! with containerd's extraction of it.

mod common;

use common::images;
use common::squashing::*;
use common::*;

fn sha12(b: &[u8]) -> String {
    common::fixtures::sha(b)[7..19].to_string()
}

/// docker 20.10 and podman 4.3 refuse the source ("duplicates of file paths not supported");
/// containerd (like umoci) extracts it in order, so `l` shares the first write of `t`.
#[test]
fn link_to_a_path_its_layer_writes_twice_matches_containerd() {
    let env = env();
    let r = publish(&env, "link-to-rewritten", images::link_to_rewritten());
    let got = check_against_containerd(&env, &r, "strata-test/link-to-rewritten:squashed");
    assert!(got["l"].contains(&sha12(b"first write")), "{got:?}");
    assert!(got["t"].contains(&sha12(b"second write")), "{got:?}");
}

#[test]
fn dir_replaced_by_a_file_in_its_own_layer_matches_docker_pull() {
    let env = env();
    let r = publish(&env, "dir-replaced", images::dir_replaced_in_layer());
    let file = check_against_oracle(&env, &r, "strata-test/dir-replaced:squashed");
    let got = layer_listing(&file);
    assert!(got["a"].starts_with("Regular 640 "), "{got:?}");
    assert!(got["keep-x"].contains(&sha12(b"own child")), "{got:?}");
}

#[test]
fn opaque_marker_at_the_root_matches_docker_pull() {
    let env = env();
    let r = publish(&env, "root-opaque", images::root_opaque());
    check_against_oracle(&env, &r, "strata-test/root-opaque:squashed");
}

#[test]
fn v7_directories_match_docker_pull() {
    let env = env();
    let r = publish(&env, "v7-dirs", images::v7_dirs());
    check_against_oracle(&env, &r, "strata-test/v7-dirs:squashed");
}

/// A lower symlink `bin → usr/bin` under an upper `bin/tool` with no `bin/` entry. Overlay-based
/// stores (overlay2, containerd's overlayfs: each layer extracted into its own empty directory, then
/// stacked) give a directory `bin` holding only `tool`, the symlink gone; vfs and native snapshotters
/// extract onto a copy of the lower tree and follow the symlink (`usr/bin/tool`). strata takes the
/// overlay rule (README, "Merge semantics"); the test daemon runs vfs, so its pull shows the other.
#[test]
fn upper_entry_under_a_lower_symlink_takes_overlay_semantics() {
    let env = env();
    let r = publish(&env, "symlink-parent", images::symlink_parent());
    let vfs = oracle(&r);
    assert!(vfs["bin"].starts_with("Symlink"), "vfs: {vfs:?}");
    assert!(vfs.contains_key("usr/bin/tool"), "vfs: {vfs:?}");
    let tag = "strata-test/symlink-parent:squashed";
    let file = fetch(shared_server(&env.registry), &r, &format!("?tag={tag}"));
    run(docker().arg("load").arg("-i").arg(&file));
    let got = export_listing(tag);
    assert!(got["bin"].starts_with("Directory 755 0:0 "), "{got:?}");
    assert!(got["bin/tool"].contains(&sha12(b"tool")), "{got:?}");
    assert!(!got.contains_key("usr/bin/tool"), "{got:?}");
    let mut want = vfs.clone();
    want.remove("usr/bin/tool");
    want.insert("bin".into(), got["bin"].clone());
    want.insert("bin/tool".into(), vfs["usr/bin/tool"].clone());
    assert_same(&want, &got, "overlay rule");
}

/// `stat` inside a container of `image`: path, mtime with nanoseconds, for each path.
fn stat_mtimes(image: &str, paths: &[&str]) -> String {
    let mut cmd = docker();
    cmd.args([
        "run",
        "--rm",
        "--network",
        "none",
        image,
        "/bin/busybox",
        "stat",
        "-c",
        "%n %y",
    ]);
    String::from_utf8(run(cmd.args(paths))).unwrap()
}

#[test]
fn fractional_pax_mtimes_match_docker_pull() {
    let env = env();
    let r = publish(&env, "frac-mtime", images::fractional_mtimes());
    let tag = "strata-test/frac-mtime:squashed";
    check_against_oracle(&env, &r, tag);
    let paths = ["/fracdir", "/fracdir/file", "/whole"];
    let want = stat_mtimes(&r, &paths);
    assert!(
        want.contains("/fracdir/file 2023-11-14 22:13:20.123456789"),
        "{want}"
    );
    assert!(
        want.contains("/fracdir 2023-11-14 22:13:21.500000000"),
        "{want}"
    );
    assert_eq!(stat_mtimes(tag, &paths), want);
}

/// docker pull expands PAX-sparse files (Go's archive/tar reads every `GNU.sparse.*` version); so
/// must strata. (Old GNU type `S` entries docker refuses: tests/hostile.rs.)
#[test]
fn pax_sparse_files_match_docker_pull() {
    let env = env();
    let r = publish(&env, "pax-sparse", images::pax_sparse());
    let tag = "strata-test/pax-sparse:squashed";
    let got = layer_listing(&check_against_oracle(&env, &r, tag));
    let mut full = vec![0u8; (3 << 20) + 4];
    full[..4].copy_from_slice(b"head");
    full[1 << 20..(1 << 20) + 6].copy_from_slice(b"middle");
    full[3 << 20..].copy_from_slice(b"tail");
    for name in ["sparse/v10", "sparse/v01"] {
        assert!(got[name].contains(&sha12(&full)), "{name}: {got:?}");
    }
}
