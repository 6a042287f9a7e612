//! The WASM package (`static/pkg/`) and the tools that build it, installed
//! at pinned versions when missing.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::run;
use crate::{Result, cargo, root, target_dir};

const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// Small rather than fast to build: see `[profile.wasm-release]`.
const WASM_PROFILE: &str = "wasm-release";

/// Builds the WASM client into `static/pkg/` and returns that directory.
pub fn build() -> Result<PathBuf> {
    ensure_wasm_target()?;
    let version = locked_version("wasm-bindgen")?;
    let bindgen = ensure_wasm_bindgen_cli(&version)?;
    run(cargo().args([
        "build",
        "-p",
        "streambridge-client",
        "--lib",
        "--locked",
        "--target",
        WASM_TARGET,
        "--profile",
        WASM_PROFILE,
    ]))?;
    let wasm = target_dir()
        .join(WASM_TARGET)
        .join(WASM_PROFILE)
        .join("streambridge_client.wasm");
    let pkg = root().join("static/pkg");
    if pkg.exists() {
        fs::remove_dir_all(&pkg).map_err(|e| format!("{}: {e}", pkg.display()))?;
    }
    run(Command::new(&bindgen)
        .args([
            "--target",
            "web",
            "--remove-name-section",
            "--remove-producers-section",
            "--out-name",
            "streambridge_client",
        ])
        .arg("--out-dir")
        .arg(&pkg)
        .arg(&wasm))?;
    // The connect-es transport: hand-written JavaScript over the WASM client.
    for file in ["connect.js", "connect.d.ts"] {
        let from = root().join("web-client/js").join(file);
        fs::copy(&from, pkg.join(file)).map_err(|e| format!("{}: {e}", from.display()))?;
    }
    write_package_json(&pkg)?;
    report_size(&pkg.join("streambridge_client_bg.wasm"))?;
    Ok(pkg)
}

fn ensure_wasm_target() -> Result {
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output();
    if installed.is_ok_and(|out| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == WASM_TARGET)
    }) {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", WASM_TARGET]))
}

/// The version of `package` in `Cargo.lock`.
fn locked_version(package: &str) -> Result<String> {
    let lock = fs::read_to_string(root().join("Cargo.lock")).map_err(|e| format!("Cargo.lock: {e}"))?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{package}\"") {
            let version = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = \"")?.strip_suffix('"'));
            return version
                .map(str::to_string)
                .ok_or_else(|| format!("no version for {package} in Cargo.lock"));
        }
    }
    Err(format!("{package} is not in Cargo.lock"))
}

/// A binary that `cargo install` put in `$CARGO_HOME/bin`.
pub fn cargo_bin(name: &str) -> PathBuf {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin").join(name)
}

/// `wasm-bindgen` at exactly `version` (the CLI and the crate must match).
fn ensure_wasm_bindgen_cli(version: &str) -> Result<PathBuf> {
    let bindgen = cargo_bin("wasm-bindgen");
    let installed = Command::new(&bindgen).arg("--version").output();
    if installed.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == format!("wasm-bindgen {version}")) {
        return Ok(bindgen);
    }
    // Not `--locked`: the CLI's own lockfile pins crates newer than the
    // registry these machines reach; the version of the CLI itself is exact.
    run(Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["install", "--force", "wasm-bindgen-cli", "--version"])
        .arg(format!("={version}")))?;
    Ok(bindgen)
}

/// `wasm-bindgen --target web` writes no `package.json`; this one makes
/// `static/pkg` installable like any npm package (`npm install ./static/pkg`).
fn write_package_json(pkg: &Path) -> Result {
    let manifest =
        fs::read_to_string(root().join("web-client/Cargo.toml")).map_err(|e| format!("web-client/Cargo.toml: {e}"))?;
    let version = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("version = \"")?.strip_suffix('"'))
        .ok_or("no version in web-client/Cargo.toml")?;
    let package = format!(
        r#"{{
  "name": "streambridge-client",
  "version": "{version}",
  "description": "Typed client for streambridge's DataService.BidirectionalStream over WebSocket (WASM)",
  "license": "MIT OR Apache-2.0",
  "type": "module",
  "main": "streambridge_client.js",
  "module": "streambridge_client.js",
  "types": "streambridge_client.d.ts",
  "exports": {{
    ".": {{
      "types": "./streambridge_client.d.ts",
      "default": "./streambridge_client.js"
    }},
    "./connect": {{
      "types": "./connect.d.ts",
      "default": "./connect.js"
    }},
    "./streambridge_client_bg.wasm": "./streambridge_client_bg.wasm"
  }},
  "files": ["streambridge_client.js", "streambridge_client.d.ts", "streambridge_client_bg.wasm", "streambridge_client_bg.wasm.d.ts", "snippets", "connect.js", "connect.d.ts"],
  "sideEffects": ["./snippets/*"],
  "peerDependencies": {{
    "@bufbuild/protobuf": "^2.0.0",
    "@connectrpc/connect": "^2.0.0"
  }},
  "peerDependenciesMeta": {{
    "@bufbuild/protobuf": {{ "optional": true }},
    "@connectrpc/connect": {{ "optional": true }}
  }}
}}
"#
    );
    fs::write(pkg.join("package.json"), package).map_err(|e| format!("package.json: {e}"))
}

fn report_size(wasm: &Path) -> Result {
    let raw = fs::metadata(wasm)
        .map_err(|e| format!("{}: {e}", wasm.display()))?
        .len();
    let gzipped = Command::new("gzip")
        .args(["-9", "-c"])
        .arg(wasm)
        .output()
        .map(|out| out.stdout.len());
    match gzipped {
        Ok(gzipped) => eprintln!("xtask: {}: {raw} bytes, {gzipped} bytes gzipped (-9)", wasm.display()),
        Err(_) => eprintln!("xtask: {}: {raw} bytes", wasm.display()),
    }
    Ok(())
}

/// The chat example's page into `examples/chat/web/dist` (after
/// [`build`]): its npm modules, then its own build script (protoc-gen-es
/// through buf, esbuild).
pub fn build_chat_page() -> Result {
    let dir = root().join("examples/chat/web");
    npm_ci(&dir)?;
    run(Command::new("node").arg("build.mjs").current_dir(&dir))
}

/// `npm ci` in `dir` unless its `node_modules` matches `package-lock.json`.
pub fn npm_ci(dir: &Path) -> Result {
    let lock = fs::read_to_string(dir.join("package-lock.json")).map_err(|e| format!("package-lock.json: {e}"))?;
    let stamp = dir.join("node_modules/.installed-lock");
    if fs::read_to_string(&stamp).is_ok_and(|installed| installed == lock) {
        return Ok(());
    }
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir))?;
    fs::write(&stamp, lock).map_err(|e| format!("{}: {e}", stamp.display()))
}
