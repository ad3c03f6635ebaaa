//! A real etcd + kube-apiserver on 127.0.0.1 for tier-1 operator tests: own ports, own temp dir,
//! certificates from openssl, admin by client certificate (O=system:masters). One per test
//! binary, started on first use and torn down at process exit (an `atexit` hook kills the
//! daemons and removes the directory; PR_SET_PDEATHSIG covers a test binary that is killed).
//! On request, kube-controller-manager with only the garbage collector joins it.
//!
//! The binaries come from `$ROOK_RBD_TEST_K8S_BIN`, else from `k8s-tests/tools.sh bin` (the
//! project's pinned build, the path CI uses too). Without them the tests print why and pass as
//! skipped on a developer's machine; under CI (`CI` set) or with `ROOK_RBD_REQUIRE_APISERVER`
//! set (as `make test` does) they fail.
#![allow(dead_code)]

pub mod operator;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::Client;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct ApiServer {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub bin: PathBuf,
    pub url: String,
    /// From spawning etcd to kube-apiserver's /readyz answering ok.
    pub start_time: Duration,
}

/// Why there is no server: binaries not built (a skip, except under CI), or it did not start.
enum Unavailable {
    NotBuilt(String),
    Failed(String),
}

static SERVER: OnceLock<Result<ApiServer, Unavailable>> = OnceLock::new();
/// What the atexit hook tears down: daemon pids and the state directory.
static TEARDOWN: Mutex<(Vec<u32>, Option<PathBuf>)> = Mutex::new((Vec::new(), None));

/// The API server of this test binary, started on first call (once: a failed start fails every
/// test that asks, it is not retried); `None`, with the reason printed, when the Kubernetes
/// binaries are not built and neither `CI` nor `ROOK_RBD_REQUIRE_APISERVER` is set.
pub fn shared() -> Option<&'static ApiServer> {
    let server = SERVER.get_or_init(|| {
        let bin = find_binaries().map_err(Unavailable::NotBuilt)?;
        on_spawner_thread(move || start(bin)).map_err(Unavailable::Failed)
    });
    match server {
        Ok(s) => Some(s),
        Err(Unavailable::Failed(why)) => panic!("{why}"),
        Err(Unavailable::NotBuilt(why)) => {
            let why = format!("{why} (build them with `bash k8s-tests/tools.sh build`)");
            for var in ["CI", "ROOK_RBD_REQUIRE_APISERVER"] {
                assert!(std::env::var_os(var).is_none(), "{var} is set but {why}");
            }
            eprintln!("skipped: {why}");
            None
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;
static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> = OnceLock::new();

/// Runs `f` on the one thread that spawns every daemon: a child started with PR_SET_PDEATHSIG
/// dies with the *thread* that forked it, so that thread lives as long as the process.
pub fn on_spawner_thread<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let jobs = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for job in rx {
                job();
            }
            // The sender is a static and is never dropped; should it be, stay alive anyway.
            loop {
                std::thread::park();
            }
        });
        Mutex::new(tx)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    jobs.lock()
        .unwrap()
        .send(job)
        .expect("the spawner thread runs");
    rx.recv().expect("the spawner thread answers")
}

/// `cmd` with PR_SET_PDEATHSIG set: it is killed when the spawner thread (the process) dies.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

static GARBAGE_COLLECTOR: OnceLock<Result<(), String>> = OnceLock::new();

impl ApiServer {
    /// Starts kube-controller-manager with only its garbage collector (once per test binary),
    /// so that objects whose owner is deleted really go, as in a cluster.
    pub fn start_garbage_collector(&'static self) {
        let started = GARBAGE_COLLECTOR.get_or_init(|| {
            on_spawner_thread(move || {
                spawn(
                    &self.dir,
                    "kube-controller-manager",
                    Command::new(self.bin.join("kube-controller-manager")).args([
                        format!("--kubeconfig={}", self.kubeconfig.display()),
                        "--controllers=garbage-collector-controller".into(),
                        "--leader-elect=false".into(),
                        "--secure-port=0".into(),
                        "--bind-address=127.0.0.1".into(),
                        "--v=1".into(),
                    ]),
                )
            })
        });
        if let Err(e) = started {
            panic!("{e}");
        }
    }

    /// A client authenticated as the admin (a new one per test: a client belongs to the tokio
    /// runtime it was made on).
    pub async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kube config");
        Client::try_from(cfg).expect("kube client")
    }

    /// `kubectl` against this server.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin.join("kubectl"));
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }
}

/// Applies `crds` (server-side, so an older version is replaced) and waits until each is
/// Established.
pub async fn install_crds(client: &Client, crds: &[CustomResourceDefinition]) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("rook-rbd-tests").force();
    for crd in crds {
        let name = crd.metadata.name.as_deref().expect("CRD name");
        api.patch(name, &pp, &Patch::Apply(crd))
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
    }
    for crd in crds {
        let name = crd.metadata.name.as_deref().unwrap();
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not Established within 30 s"))
        .expect("watching the CRD");
    }
}

/// Creates namespace `name` unless it exists.
pub async fn namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.into());
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

fn find_binaries() -> Result<PathBuf, String> {
    let bin = match std::env::var_os("ROOK_RBD_TEST_K8S_BIN") {
        Some(b) => PathBuf::from(b),
        None => {
            let tools = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s-tests/tools.sh");
            let out = Command::new("bash")
                .args([tools, "bin"])
                .stderr(Stdio::null())
                .output()
                .map_err(|e| format!("running k8s-tests/tools.sh bin: {e}"))?;
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    for b in ["etcd", "kube-apiserver", "kubectl"] {
        if !bin.join(b).is_file() {
            return Err(format!("{b} is not in {}", bin.display()));
        }
    }
    Ok(bin)
}

fn free_port() -> u16 {
    // The port is free once the listener is dropped; etcd and kube-apiserver bind it right after.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn start(bin: PathBuf) -> Result<ApiServer, String> {
    let dir = tempfile::Builder::new()
        .prefix("rook-rbd-apiserver-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?
        .keep();
    TEARDOWN.lock().unwrap().1 = Some(dir.clone());
    // SAFETY: registering a plain extern "C" function with no captured state.
    unsafe { libc::atexit(teardown) };

    let t0 = Instant::now();
    make_pki(&dir)?;
    let pki_time = t0.elapsed();
    let (etcd_client, etcd_peer, secure) = (free_port(), free_port(), free_port());
    let etcd_url = format!("http://127.0.0.1:{etcd_client}");
    let t1 = Instant::now();
    spawn(
        &dir,
        "etcd",
        Command::new(bin.join("etcd")).args([
            "--name=tier1",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls={etcd_url}"),
            &format!("--advertise-client-urls={etcd_url}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            &format!("--initial-cluster=tier1=http://127.0.0.1:{etcd_peer}"),
            "--listen-metrics-urls=",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]),
    )?;
    let p = |f: &str| dir.join(f).display().to_string();
    spawn(
        &dir,
        "kube-apiserver",
        Command::new(bin.join("kube-apiserver")).args([
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={secure}"),
            format!("--cert-dir={}", p("certs")),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.96.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ]),
    )?;
    let url = format!("https://127.0.0.1:{secure}");
    let kubeconfig = dir.join("admin.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: tier1, cluster: {{server: \"{url}\", certificate-authority: {ca}}}}}]\n\
             users: [{{name: admin, user: {{client-certificate: {crt}, client-key: {key}}}}}]\n\
             contexts: [{{name: tier1, context: {{cluster: tier1, user: admin}}}}]\n\
             current-context: tier1\n",
            ca = p("ca.crt"),
            crt = p("admin.crt"),
            key = p("admin.key"),
        ),
    )
    .map_err(|e| format!("writing the kubeconfig: {e}"))?;
    let server = ApiServer {
        dir: dir.clone(),
        kubeconfig,
        bin,
        url,
        start_time: Duration::ZERO,
    };
    wait_ready(&server)?;
    let start_time = t1.elapsed();
    eprintln!(
        "[apiserver] etcd + kube-apiserver ready at {} in {:.2} s (certificates {:.2} s)",
        server.url,
        start_time.as_secs_f64(),
        pki_time.as_secs_f64()
    );
    Ok(ApiServer {
        start_time,
        ..server
    })
}

fn wait_ready(server: &ApiServer) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = server.client().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            let req = tonic::codegen::http::Request::get("/readyz")
                .body(Vec::new())
                .unwrap();
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "kube-apiserver not ready within 60 s ({last}); logs in {}",
            server.dir.display()
        ))
    })
}

fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Result<(), String> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))
        .map_err(|e| format!("{name} log: {e}"))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    die_with_parent(cmd);
    let child = cmd.spawn().map_err(|e| format!("starting {name}: {e}"))?;
    // Reaped by the teardown hook, which is also what stops it.
    TEARDOWN.lock().unwrap().0.push(child.id());
    Ok(())
}

extern "C" fn teardown() {
    let Ok(mut t) = TEARDOWN.lock() else { return };
    for pid in t.0.drain(..).rev() {
        // SAFETY: plain syscalls on pids this process spawned and has not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
    }
    if let Some(dir) = t.1.take() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A CA, a serving certificate for 127.0.0.1, an admin client certificate and the service
/// account key pair, all P-256 (much faster to make than RSA).
fn make_pki(dir: &Path) -> Result<(), String> {
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("openssl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=rook-rbd-tier1-ca",
    ]);
    openssl(&ca)?;
    for (name, subject, ext) in [
        (
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "admin",
            "/CN=admin/O=system:masters",
            "extendedKeyUsage=clientAuth\n",
        ),
    ] {
        let (key, csr, crt, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extfile), ext).map_err(|e| e.to_string())?;
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
        openssl(&req)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ])?;
    }
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "sa.key",
    ])?;
    openssl(&["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"])
}
