//! Imports of image tars built here with the `tar` crate, gzip and zstd: the trees
//! they give, and the ones refused.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

/// A tar member to write.
enum M<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    /// A raw name the `tar` crate's builder would refuse (`../x`).
    RawFile(&'a [u8], &'a [u8]),
    /// A pax header naming the next member.
    PaxPath(&'a str),
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn tar_of(members: &[M<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for m in members {
        match m {
            M::File(p, data) => {
                let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            M::Dir(p) => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, p, io::empty()).unwrap();
            }
            M::Symlink(p, t) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, t).unwrap();
            }
            M::RawFile(name, data) => {
                let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
                let gnu = h.as_gnu_mut().unwrap();
                gnu.name = [0; 100];
                gnu.name[..name.len()].copy_from_slice(name);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            M::PaxPath(p) => {
                let rec = pax_record("path", p);
                let mut h = header(tar::EntryType::XHeader, 0o644, rec.len() as u64);
                h.set_cksum();
                b.append(&h, rec.as_slice()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// `"<len> key=value\n"`, where len counts the whole record.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

struct Work {
    _dir: tempfile::TempDir,
    file: PathBuf,
    scratch: PathBuf,
    tree: PathBuf,
}

fn work(image: &[u8]) -> Work {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("image.tar");
    fs::write(&file, image).unwrap();
    let (scratch, tree) = (dir.path().join("scratch"), dir.path().join("tree"));
    fs::create_dir(&scratch).unwrap();
    fs::create_dir(&tree).unwrap();
    Work {
        _dir: dir,
        file,
        scratch,
        tree,
    }
}

fn import(image: &[u8]) -> (Work, Result<Assembled, ImportError>) {
    let w = work(image);
    let r = assemble_tree(
        &w.file,
        &w.scratch,
        &w.tree,
        &ImportLimits::default(),
        &|_| {},
    );
    (w, r)
}

/// Two layers: the first makes a small root, the second deletes `etc/gone` (whiteout),
/// replaces `opt/d` (opaque) and adds `etc/new`.
fn two_layers() -> (Vec<u8>, Vec<u8>) {
    let l1 = tar_of(&[
        M::Dir("etc/"),
        M::File("etc/gone", b"old"),
        M::File("etc/kept", b"kept"),
        M::Dir("opt/d/"),
        M::File("opt/d/old", b"x"),
        M::Symlink("bin", "usr/bin"),
    ]);
    let l2 = tar_of(&[
        M::File("etc/.wh.gone", b""),
        M::File("etc/new", b"new"),
        M::File("opt/d/.wh..wh..opq", b""),
        M::File("opt/d/fresh", b"y"),
    ]);
    (l1, l2)
}

fn check_two_layer_tree(tree: &Path) {
    assert!(
        !tree.join("etc/gone").exists(),
        "the whiteout deleted etc/gone"
    );
    assert_eq!(fs::read(tree.join("etc/kept")).unwrap(), b"kept");
    assert_eq!(fs::read(tree.join("etc/new")).unwrap(), b"new");
    assert!(
        !tree.join("opt/d/old").exists(),
        "the opaque dir replaced opt/d"
    );
    assert!(tree.join("opt/d/fresh").is_file());
    assert_eq!(
        fs::read_link(tree.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    // No overlay markers are left in a base tree.
    for p in ["etc/.wh.gone", "opt/d/.wh..wh..opq"] {
        assert!(tree.join(p).symlink_metadata().is_err(), "{p}");
    }
}

fn docker_save(layers: &[(&str, &[u8])], diff_ids: Option<Vec<String>>) -> Vec<u8> {
    let names: Vec<&str> = layers.iter().map(|(n, _)| *n).collect();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": ["example:latest"],
        "Layers": names,
    }])
    .to_string();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids.unwrap_or_default() },
    })
    .to_string();
    let mut members = vec![
        M::File("manifest.json", manifest.as_bytes()),
        M::File("config.json", config.as_bytes()),
    ];
    for (n, data) in layers {
        members.push(M::File(n, data));
    }
    tar_of(&members)
}

#[test]
fn docker_save_layers_apply_in_order_with_whiteouts() {
    let (l1, l2) = two_layers();
    let ids = vec![
        format!("sha256:{}", sha(&l1)),
        format!("sha256:{}", sha(&l2)),
    ];
    let image = docker_save(&[("a/layer.tar", &l1), ("b/layer.tar", &l2)], Some(ids));
    let (w, r) = import(&image);
    let done = r.unwrap();
    assert_eq!(done.layout, ImageLayout::DockerSave);
    assert_eq!(done.layers, 2);
    assert!(done.whiteouts >= 2, "{done:?}");
    check_two_layer_tree(&w.tree);
    assert_eq!(
        fs::read_dir(&w.scratch).unwrap().count(),
        0,
        "scratch emptied"
    );
}

#[test]
fn docker_save_shared_layer_symlink_is_followed() {
    // docker save writes a layer two images share once, and a symlink for the other.
    let (l1, _) = two_layers();
    let manifest =
        serde_json::json!([{ "Config": "c.json", "Layers": ["b/layer.tar"] }]).to_string();
    let image = tar_of(&[
        M::File("manifest.json", manifest.as_bytes()),
        M::File("a/layer.tar", &l1),
        M::Symlink("b/layer.tar", "../a/layer.tar"),
    ]);
    let (w, r) = import(&image);
    assert_eq!(r.unwrap().layers, 1);
    assert!(w.tree.join("etc/gone").is_file());
}

#[test]
fn a_layer_that_does_not_match_its_diff_id_is_refused() {
    let (l1, l2) = two_layers();
    let ids = vec![
        format!("sha256:{}", sha(&l1)),
        format!("sha256:{}", sha(&l1)),
    ];
    let image = docker_save(&[("a/layer.tar", &l1), ("b/layer.tar", &l2)], Some(ids));
    let (_w, r) = import(&image);
    let e = r.unwrap_err();
    assert!(matches!(e, ImportError::Digest { .. }), "{e}");
    assert!(e.to_string().contains("layer 2 of 2"), "{e}");
}

#[test]
fn a_docker_save_tar_missing_a_layer_is_refused_naming_it() {
    let (l1, _) = two_layers();
    let manifest =
        serde_json::json!([{ "Config": "c.json", "Layers": ["a/layer.tar", "b/layer.tar"] }])
            .to_string();
    let image = tar_of(&[
        M::File("manifest.json", manifest.as_bytes()),
        M::File("a/layer.tar", &l1),
    ]);
    let (_w, r) = import(&image);
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("layer 2 of 2 `b/layer.tar` is not in the archive"),
        "{e}"
    );
}

#[test]
fn oci_layout_with_gzip_layers_and_a_platform_index() {
    let (l1, l2) = two_layers();
    let (g1, g2) = (gzip(&l1), gzip(&l2));
    let config = serde_json::json!({
        "rootfs": { "type": "layers",
            "diff_ids": [format!("sha256:{}", sha(&l1)), format!("sha256:{}", sha(&l2))] },
    })
    .to_string();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": format!("sha256:{}", sha(config.as_bytes())), "size": config.len() },
        "layers": [
            { "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
              "digest": format!("sha256:{}", sha(&g1)), "size": g1.len() },
            { "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
              "digest": format!("sha256:{}", sha(&g2)), "size": g2.len() },
        ],
    })
    .to_string();
    // Another platform's manifest and an attestation come first: neither is taken.
    let other = serde_json::json!({ "schemaVersion": 2, "layers": [] }).to_string();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            { "mediaType": "application/vnd.oci.image.manifest.v1+json",
              "digest": format!("sha256:{}", sha(other.as_bytes())),
              "platform": { "os": "linux", "architecture": "s390x" } },
            { "mediaType": "application/vnd.oci.image.manifest.v1+json",
              "digest": format!("sha256:{}", sha(other.as_bytes())),
              "platform": { "os": "unknown", "architecture": "unknown" },
              "annotations": { "vnd.docker.reference.type": "attestation-manifest" } },
            { "mediaType": "application/vnd.oci.image.manifest.v1+json",
              "digest": format!("sha256:{}", sha(manifest.as_bytes())),
              "platform": { "os": "linux", "architecture": host_arch() } },
        ],
    })
    .to_string();
    let blob = |bytes: &[u8]| format!("blobs/sha256/{}", sha(bytes));
    let paths = [
        blob(&g1),
        blob(&g2),
        blob(config.as_bytes()),
        blob(manifest.as_bytes()),
        blob(other.as_bytes()),
    ];
    let image = tar_of(&[
        M::File("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        M::File("index.json", index.as_bytes()),
        M::File(&paths[0], &g1),
        M::File(&paths[1], &g2),
        M::File(&paths[2], config.as_bytes()),
        M::File(&paths[3], manifest.as_bytes()),
        M::File(&paths[4], other.as_bytes()),
    ]);
    let (w, r) = import(&image);
    let done = r.unwrap();
    assert_eq!(done.layout, ImageLayout::Oci);
    assert_eq!(done.layers, 2);
    assert_eq!(done.bytes, (l1.len() + l2.len()) as u64);
    check_two_layer_tree(&w.tree);

    // The same image, gzip-compressed as a whole, gives the same tree.
    let (w2, r2) = import(&gzip(&image));
    r2.unwrap();
    assert_eq!(tree_id(&w.tree).unwrap(), tree_id(&w2.tree).unwrap());

    // A blob whose bytes do not hash to its name is refused.
    let mut bad = g2.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let tampered = tar_of(&[
        M::File("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        M::File("index.json", index.as_bytes()),
        M::File(&paths[0], &g1),
        M::File(&paths[1], &bad),
        M::File(&paths[2], config.as_bytes()),
        M::File(&paths[3], manifest.as_bytes()),
    ]);
    let (_w3, r3) = import(&tampered);
    let e = r3.unwrap_err();
    assert!(matches!(e, ImportError::Digest { .. }), "{e}");
}

#[test]
fn a_plain_rootfs_tar_with_a_root_entry_imports() {
    // `tar -C DIR -c .` writes `./` first; mmdebstrap's pax tars name it in a pax header.
    let image = tar_of(&[
        M::PaxPath("./"),
        M::Dir("./"),
        M::Dir("./etc/"),
        M::File("./etc/hostname", b"h\n"),
        M::File("./bin-marker", b"m"),
    ]);
    // unpack alone refuses the root entry: the filter is what lets it through.
    let d = tempfile::tempdir().unwrap();
    let raw = udos_layer::unpack(image.as_slice(), d.path(), &UnpackLimits::default());
    assert!(raw.is_err(), "unpack refuses `./`");
    let (w, r) = import(&image);
    let done = r.unwrap();
    assert_eq!(done.layout, ImageLayout::RootfsTar);
    assert_eq!(fs::read(w.tree.join("etc/hostname")).unwrap(), b"h\n");
    assert_eq!(
        fs::metadata(w.tree.join("bin-marker")).unwrap().mtime(),
        1_700_000_000
    );
    // zstd as a whole works too.
    let z = zstd::encode_all(image.as_slice(), 3).unwrap();
    let (w2, r2) = import(&z);
    r2.unwrap();
    assert!(w2.tree.join("etc/hostname").is_file());
}

#[test]
fn escaping_paths_are_refused() {
    let image = tar_of(&[M::Dir("etc/"), M::RawFile(b"../escaped", b"x")]);
    let (w, r) = import(&image);
    let e = r.unwrap_err();
    assert!(
        matches!(
            &e,
            ImportError::Layer {
                cause: UnpackError::InvalidPath { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("`..`"), "{e}");
    assert!(!w.tree.parent().unwrap().join("escaped").exists());
}

#[test]
fn xz_is_refused_with_a_hint() {
    let (_w, r) = import(&[0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2, 3]);
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("xz-compressed") && e.contains("decompress it first"),
        "{e}"
    );
}

#[test]
fn the_image_total_is_bounded() {
    let (l1, l2) = two_layers();
    let image = docker_save(&[("a/layer.tar", &l1), ("b/layer.tar", &l2)], None);
    let w = work(&image);
    let limits = ImportLimits {
        max_total_bytes: l1.len() as u64 + 100,
        ..ImportLimits::default()
    };
    let e = assemble_tree(&w.file, &w.scratch, &w.tree, &limits, &|_| {}).unwrap_err();
    assert!(
        matches!(
            &e,
            ImportError::Layer {
                index: 2,
                cause: UnpackError::Limit { .. },
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn tree_id_follows_content_and_metadata() {
    let (l1, _) = two_layers();
    let (a, ra) = import(&l1);
    let (b, rb) = import(&l1);
    ra.unwrap();
    rb.unwrap();
    let id = tree_id(&a.tree).unwrap();
    assert_eq!(id.len(), 64);
    assert_eq!(id, tree_id(&b.tree).unwrap());
    fs::set_permissions(b.tree.join("etc/kept"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_ne!(id, tree_id(&b.tree).unwrap());
}

#[test]
fn skip_root_entry_passes_everything_else_unchanged() {
    let plain = tar_of(&[
        M::Dir("etc/"),
        M::File("etc/a", b"abc"),
        M::PaxPath("x"),
        M::File("x", b""),
    ]);
    let mut out = Vec::new();
    SkipRootEntry::new(plain.as_slice())
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, plain);
}

#[test]
fn names() {
    assert!(check_base_name("ubuntu-22.04").is_ok());
    assert!(check_base_name("a").is_ok());
    for bad in ["", "-x", ".x", "A", "a/b", "a b", &"x".repeat(65)] {
        assert!(check_base_name(bad).is_err(), "{bad:?}");
    }
    assert!(check_base_name("debian").unwrap_err().contains("built-in"));
    assert_eq!(
        default_base_name(Path::new("/x/My Image.tar.gz")),
        "my-image"
    );
    assert_eq!(default_base_name(Path::new("alpine.tar")), "alpine");
    assert_eq!(normalize("./a//b/"), Some("a/b".into()));
    assert_eq!(normalize("a/../../b"), None);
    assert_eq!(normalize("b/../a"), Some("a".into()));
}
