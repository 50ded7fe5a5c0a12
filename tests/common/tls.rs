//! TLS fixtures made at test time with `openssl`: a CA, server and client
//! certificates in QEMU's `tls-creds-x509` directory layout, the bad cases
//! (another CA, an expired server certificate, one for another name), and
//! TCP helpers (a free port, waiting for a listener).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::Holder;
use super::run::run_checked;

/// The certificate directories of one test, all under `root`.
pub struct Certs {
    /// Server side (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`),
    /// for `localhost` and `127.0.0.1`.
    pub server: PathBuf,
    /// Server side with a certificate that expired in 2020.
    pub server_expired: PathBuf,
    /// Server side with a certificate for `other.example` only.
    pub server_other_name: PathBuf,
    /// Client side: the CA only.
    pub client: PathBuf,
    /// Client side: the CA, `client-cert.pem` and `client-key.pem`.
    pub client_with_cert: PathBuf,
    /// Client side: another CA, which did not sign the server's
    /// certificate.
    pub client_wrong_ca: PathBuf,
}

const CA_EXT: &str = "[req]\ndistinguished_name=dn\n[dn]\n[v3_ca]\n\
    basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
    subjectKeyIdentifier=hash\n";
const CA_DB: &str = "[ca]\ndefault_ca=ca0\n[ca0]\ndatabase=index.txt\nnew_certs_dir=.\n\
    serial=serial\ndefault_md=sha256\npolicy=pol\n[pol]\ncommonName=supplied\n";

fn openssl(dir: &Path, args: &[&str]) {
    run_checked(Command::new("openssl").args(args).current_dir(dir));
}

fn leaf_ext(usage: &str, san: Option<&str>) -> String {
    let mut s = format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage={usage}\n"
    );
    if let Some(san) = san {
        s.push_str(&format!("subjectAltName={san}\n"));
    }
    s
}

/// A CA (`NAME-ca-cert.pem`, `NAME-ca-key.pem`) in `work`.
fn make_ca(work: &Path, name: &str) {
    std::fs::write(work.join("ca.cnf"), CA_EXT).unwrap();
    openssl(
        work,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}-ca-key.pem"),
            "-out",
            &format!("{name}-ca-cert.pem"),
            "-days",
            "30",
            "-subj",
            &format!("/CN=qbackup test {name} CA"),
            "-config",
            "ca.cnf",
            "-extensions",
            "v3_ca",
        ],
    );
}

/// A key and a certificate `NAME-cert.pem` signed by CA `ca`, valid from
/// `dates` (`None`: now for 30 days; else openssl ca's start and end).
fn make_leaf(work: &Path, ca: &str, name: &str, ext: &str, dates: Option<(&str, &str)>) {
    std::fs::write(work.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        work,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    let (cert, key) = (format!("{ca}-ca-cert.pem"), format!("{ca}-ca-key.pem"));
    match dates {
        None => openssl(
            work,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &cert,
                "-CAkey",
                &key,
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}-cert.pem"),
            ],
        ),
        Some((start, end)) => {
            std::fs::write(work.join("db.cnf"), CA_DB).unwrap();
            std::fs::write(work.join("index.txt"), "").unwrap();
            std::fs::write(work.join("serial"), "1000\n").unwrap();
            openssl(
                work,
                &[
                    "ca",
                    "-batch",
                    "-config",
                    "db.cnf",
                    "-cert",
                    &cert,
                    "-keyfile",
                    &key,
                    "-in",
                    &format!("{name}.csr"),
                    "-out",
                    &format!("{name}-cert.pem"),
                    "-startdate",
                    start,
                    "-enddate",
                    end,
                    "-extfile",
                    &format!("{name}.ext"),
                    "-notext",
                ],
            );
        }
    }
}

fn install(work: &Path, dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (from, to) in files {
        std::fs::copy(work.join(from), dir.join(to)).unwrap();
    }
}

impl Certs {
    /// Makes every certificate under `root` (a fresh directory).
    pub fn make(root: &Path) -> Certs {
        let work = root.join("work");
        std::fs::create_dir_all(&work).unwrap();
        make_ca(&work, "good");
        make_ca(&work, "other");
        let names = Some("DNS:localhost,IP:127.0.0.1");
        make_leaf(
            &work,
            "good",
            "server",
            &leaf_ext("serverAuth", names),
            None,
        );
        make_leaf(
            &work,
            "good",
            "expired",
            &leaf_ext("serverAuth", names),
            Some(("20200101000000Z", "20200102000000Z")),
        );
        make_leaf(
            &work,
            "good",
            "elsewhere",
            &leaf_ext("serverAuth", Some("DNS:other.example")),
            None,
        );
        make_leaf(&work, "good", "client", &leaf_ext("clientAuth", None), None);
        let server = |leaf: &str| {
            [
                ("good-ca-cert.pem", "ca-cert.pem"),
                (&*format!("{leaf}-cert.pem"), "server-cert.pem"),
                (&*format!("{leaf}-key.pem"), "server-key.pem"),
            ]
            .map(|(a, b)| (a.to_string(), b))
        };
        let certs = Certs {
            server: root.join("server"),
            server_expired: root.join("server-expired"),
            server_other_name: root.join("server-other-name"),
            client: root.join("client"),
            client_with_cert: root.join("client-with-cert"),
            client_wrong_ca: root.join("client-wrong-ca"),
        };
        for (dir, leaf) in [
            (&certs.server, "server"),
            (&certs.server_expired, "expired"),
            (&certs.server_other_name, "elsewhere"),
        ] {
            let files = server(leaf);
            let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), *b)).collect();
            install(&work, dir, &refs);
        }
        install(&work, &certs.client, &[("good-ca-cert.pem", "ca-cert.pem")]);
        install(
            &work,
            &certs.client_with_cert,
            &[
                ("good-ca-cert.pem", "ca-cert.pem"),
                ("client-cert.pem", "client-cert.pem"),
                ("client-key.pem", "client-key.pem"),
            ],
        );
        install(
            &work,
            &certs.client_wrong_ca,
            &[("other-ca-cert.pem", "ca-cert.pem")],
        );
        certs
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local address").port()
}

/// Whether a socket listens on TCP `port` (any address), from
/// `/proc/net/tcp{,6}`: no probe connection, which a server that serves
/// one client (qemu-nbd without `-t`) would take for its client.
pub fn tcp_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|t| {
            t.lines().skip(1).any(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
            })
        })
    })
}

/// Starts `cmd` and waits (bounded) until it listens on TCP `port`.
pub fn hold_tcp(cmd: &mut Command, port: u16) -> Holder {
    super::process::hold_until(cmd, &format!("port {port}"), || tcp_listening(port))
}
