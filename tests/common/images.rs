//! Fixture images shared by the squash and ACI tests: each one a case the merge must get right.

use serde_json::json;

use super::fixtures::{Comp, Image, Layer};

pub fn basic() -> Vec<Image> {
    vec![Image::new(vec![
        (
            Layer::new()
                .dir("etc", 0o755)
                .file("etc/os-release", 0o644, b"NAME=fixture\n")
                .dir("usr", 0o755)
                .dir("usr/bin", 0o755)
                .file("usr/bin/app", 0o755, b"#!/bin/sh\necho app\n")
                .symlink("bin", "usr/bin"),
            Comp::Gzip,
        ),
        (
            Layer::new()
                .dir("etc", 0o700)
                .file("etc/os-release", 0o600, b"NAME=changed\n")
                .file("new", 0o644, b"n"),
            Comp::Gzip,
        ),
    ])]
}

pub fn whiteouts() -> Vec<Image> {
    let base = Layer::new()
        .dir("opq", 0o755)
        .file("opq/lower1", 0o644, b"l1")
        .dir("opq/sub", 0o755)
        .file("opq/sub/deep", 0o644, b"deep")
        .dir("recreated", 0o755)
        .file("recreated/old", 0o644, b"old")
        .file("refile", 0o644, b"old file")
        .dir("dir2file", 0o755)
        .file("dir2file/child", 0o644, b"c")
        .dir("dir2link", 0o755)
        .file("dir2link/child", 0o644, b"c")
        .file("file2dir", 0o644, b"f")
        .dir("gone", 0o755)
        .file("gone/x", 0o644, b"x")
        .file("keep", 0o644, b"keep");
    let upper = Layer::new()
        // Opaque marker after the layer's own children of the directory.
        .dir("opq", 0o755)
        .file("opq/mine", 0o644, b"mine")
        .opaque("opq")
        // Whiteout, then re-creation of the same name in one layer.
        .whiteout("recreated")
        .dir("recreated", 0o750)
        .file("recreated/new", 0o644, b"new")
        .whiteout("refile")
        .file("refile", 0o644, b"new file")
        // Replacements without whiteouts.
        .file("dir2file", 0o644, b"now a file")
        .symlink("dir2link", "/keep")
        .dir("file2dir", 0o755)
        .file("file2dir/inside", 0o644, b"i");
    let whiteout_only = Layer::new().whiteout("gone");
    let empty = Layer::new();
    vec![Image::new(vec![
        (base, Comp::Gzip),
        (upper, Comp::Gzip),
        (whiteout_only, Comp::Gzip),
        (empty, Comp::Gzip),
    ])]
}

pub fn hardlinks() -> Vec<Image> {
    let base = Layer::new()
        .dir("lib", 0o755)
        .file("lib/target", 0o644, b"same-layer target")
        .hardlink("lib/same", "lib/target", 0o644)
        .file("lib/lower", 0o644, b"lower target")
        .file("lib/deleted", 0o644, b"deleted above")
        .hardlink("lib/link-to-deleted", "lib/deleted", 0o644)
        .file("lib/overwritten", 0o644, b"original content")
        .hardlink("lib/link-to-overwritten", "lib/overwritten", 0o644);
    let mid = Layer::new().hardlink("lib/upper-link", "lib/lower", 0o644);
    let top = Layer::new()
        .whiteout("lib/deleted")
        .file("lib/overwritten", 0o644, b"new content");
    vec![Image::new(vec![
        (base, Comp::Gzip),
        (mid, Comp::Gzip),
        (top, Comp::Gzip),
    ])]
}

pub fn special() -> Vec<Image> {
    let long_dir = format!("long/{}", "d".repeat(120));
    let long_file = format!("{long_dir}/{}", "f".repeat(150));
    let long_target = format!("/{}", "t".repeat(200));
    let layer = Layer::new()
        .dir("long", 0o755)
        .dir(&long_dir, 0o755)
        .file(&long_file, 0o644, b"long name")
        .symlink("long/sym", &long_target)
        .symlink("abs", "/etc/passwd")
        .symlink("rel", "../x/y")
        .dir("dev", 0o755)
        .device("dev/null2", true, 1, 3)
        .device("dev/blk", false, 7, 0)
        .fifo("fifo")
        .pax_file(
            "xattr",
            0o644,
            b"x",
            &[
                ("SCHILY.xattr.user.strata", b"yes"),
                ("SCHILY.xattr.user.bin", &[0, 1, 2]),
            ],
        )
        .file_owned("bigids", 0o4755, 3_000_000, 2_500_000, b"suid")
        .file("sgid", 0o2755, b"g")
        .dir("sticky", 0o1777)
        .file("été", 0o644, b"utf8");
    vec![Image::new(vec![
        (Layer::new().file("base", 0o644, b"b"), Comp::Gzip),
        (layer, Comp::Gzip),
    ])]
}

/// A busybox image whose command prints a greeting: something that runs.
pub fn busybox() -> Image {
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static installed by scripts/test.sh");
    let mut image = Image::new(vec![
        (
            Layer::new()
                .dir("bin", 0o755)
                .file("bin/busybox", 0o755, &busybox),
            Comp::Gzip,
        ),
        (
            Layer::new()
                .hardlink("bin/sh", "bin/busybox", 0o755)
                .hardlink("bin/echo", "bin/busybox", 0o755)
                .dir("etc", 0o755)
                .file("etc/greeting", 0o644, b"hello from a squashed image\n"),
            Comp::Gzip,
        ),
    ]);
    image.config = json!({"Cmd": ["/bin/sh", "-c", "cat /etc/greeting"], "Env": ["A=b=c"]});
    image
}

/// Every layer compression; `all_gzip` gives the twin with the same uncompressed layers, gzipped.
pub fn compression(all_gzip: bool) -> Vec<Image> {
    let comp = |c| if all_gzip { Comp::Gzip } else { c };
    vec![Image::new(vec![
        (
            Layer::new()
                .dir("a", 0o755)
                .file("a/gz", 0o644, &[b'g'; 5000])
                .file("a/gz2", 0o644, b"second member"),
            comp(Comp::GzipMulti),
        ),
        (
            Layer::new()
                .dir("b", 0o755)
                .file("b/zstd", 0o644, &[b'z'; 5000])
                .file("b/z2", 0o644, b"second frame"),
            comp(Comp::ZstdMulti),
        ),
        (
            Layer::new()
                .file("plain", 0o644, b"uncompressed layer")
                .whiteout("a/gz2"),
            comp(Comp::None),
        ),
        (
            Layer::new().file("single-zstd", 0o644, b"z"),
            comp(Comp::Zstd),
        ),
    ])]
}

/// A layer holding paths twice (`./x` and `x` are one path): the last occurrence wins. No docker
/// oracle: docker pull refuses such a layer.
pub fn duplicates() -> Vec<Image> {
    let lower = Layer::new()
        .file("dup", 0o644, b"dup-lower")
        .dir("dir2dup", 0o755)
        .file("dir2dup/child", 0o644, b"c");
    let upper = Layer::new()
        .raw_name("./dup", tar::EntryType::Regular, 0o600, b"first")
        .raw_name("dup", tar::EntryType::Regular, 0o640, b"second")
        // A directory replaced by a file, then the file written again: the lower subtree is gone.
        .raw_name("dir2dup", tar::EntryType::Regular, 0o644, b"one")
        .raw_name("./dir2dup", tar::EntryType::Regular, 0o644, b"two");
    vec![Image::new(vec![(lower, Comp::Gzip), (upper, Comp::Gzip)])]
}

/// One image for amd64 and one for arm64, each with a file saying which.
pub fn multiarch() -> Vec<Image> {
    let mut amd = Image::new(vec![(
        Layer::new().file("arch", 0o644, b"amd64"),
        Comp::Gzip,
    )]);
    amd.arch = "amd64";
    let mut arm = Image::new(vec![(
        Layer::new().file("arch", 0o644, b"arm64"),
        Comp::Gzip,
    )]);
    arm.arch = "arm64";
    vec![amd, arm]
}

/// A base layer for the merge cases below: a bit of everything they replace.
fn merge_base() -> Layer {
    Layer::new()
        .dir("a", 0o755)
        .file("a/lower", 0o644, b"lower child")
        .file("t", 0o644, b"lower t")
        .file("keep", 0o644, b"kept")
}

/// A hardlink to a path its own layer writes twice (`t`, `l → t`, `t` again): `l` keeps what `t` held
/// when the link was made. docker pull and podman pull refuse the layer (duplicate paths); containerd
/// extracts it.
pub fn link_to_rewritten() -> Vec<Image> {
    let upper = Layer::new()
        .raw_name("t", tar::EntryType::Regular, 0o644, b"first write")
        .hardlink("l", "t", 0o644)
        .raw_name("t", tar::EntryType::Regular, 0o600, b"second write");
    vec![Image::new(vec![
        (merge_base(), Comp::Gzip),
        (upper, Comp::Gzip),
    ])]
}

/// A directory filled and then replaced by a file in the same layer: the file wins, and neither the
/// layer's own children nor the lower ones survive.
pub fn dir_replaced_in_layer() -> Vec<Image> {
    let upper = Layer::new()
        .file("a/x", 0o644, b"own child")
        .hardlink("keep-x", "a/x", 0o644)
        .file("a", 0o640, b"now a file");
    vec![Image::new(vec![
        (merge_base(), Comp::Gzip),
        (upper, Comp::Gzip),
    ])]
}

/// An opaque marker at the root of a layer: every lower entry is gone.
pub fn root_opaque() -> Vec<Image> {
    let upper = Layer::new()
        .file(".wh..wh..opq", 0o600, b"")
        .file("new", 0o644, b"only this");
    vec![Image::new(vec![
        (merge_base(), Comp::Gzip),
        (upper, Comp::Gzip),
    ])]
}

/// Old V7 directory entries (typeflag NUL, trailing `/`), with children.
pub fn v7_dirs() -> Vec<Image> {
    let layer = Layer::new()
        .v7("v7dir/", 0o750, b"")
        .file("v7dir/child", 0o644, b"child")
        .v7("v7dir/sub/", 0o700, b"")
        .file("v7dir/sub/deeper", 0o644, b"deeper")
        .v7("v7file", 0o644, b"a V7 file");
    vec![Image::new(vec![
        (merge_base(), Comp::Gzip),
        (layer, Comp::Gzip),
    ])]
}

/// A lower symlink `bin → usr/bin` and an upper `bin/tool` with no `bin/` entry.
pub fn symlink_parent() -> Vec<Image> {
    let lower = Layer::new()
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/app", 0o755, b"app")
        .symlink("bin", "usr/bin");
    let upper = Layer::new().file("bin/tool", 0o755, b"tool");
    vec![Image::new(vec![(lower, Comp::Gzip), (upper, Comp::Gzip)])]
}

/// Sub-second PAX mtimes on a file, a directory and a symlink, over busybox (to stat them with).
pub fn fractional_mtimes() -> Vec<Image> {
    let mut image = busybox();
    let layer = Layer::new()
        .pax_entry(
            tar::EntryType::Directory,
            "fracdir",
            0o755,
            b"",
            &[("mtime", b"1700000001.5")],
        )
        .pax_file(
            "fracdir/file",
            0o644,
            b"nanoseconds",
            &[("mtime", b"1700000000.123456789")],
        )
        .pax_file("whole", 0o644, b"w", &[("mtime", b"1700000002")]);
    image.layers.push((layer, Comp::Gzip));
    vec![image]
}

/// Sparse files as GNU tar writes them with `--sparse --format=pax` (map versions 1.0 and 0.1).
pub fn pax_sparse() -> Vec<Image> {
    let regions: &[(u64, &[u8])] = &[(0, b"head"), (1 << 20, b"middle"), (3 << 20, b"tail")];
    let layer = Layer::new()
        .dir("sparse", 0o755)
        .pax_sparse("1.0", "sparse/v10", (3 << 20) + 4, regions)
        .pax_sparse("0.1", "sparse/v01", (3 << 20) + 4, regions)
        // A hole at the end: the real size is past the last region.
        .pax_sparse("1.0", "sparse/tail-hole", 10_000, &[(512, b"x")])
        .file("after", 0o644, b"after the sparse files");
    vec![Image::new(vec![
        (merge_base(), Comp::Gzip),
        (layer, Comp::Gzip),
    ])]
}
