//! The browser pages of `--web` (`server.web`), served by the admin listener: the chat page at
//! `/chat`, the dashboard at `/dashboard`, their scripts under `/web/`, and `/web/config.json`,
//! which tells the chat page where the WebSocket listener is.
//!
//! The files are embedded in the binary (`include_str!` of `clients/js`: the HTML pages and
//! the committed `dist/` that `npm run build` makes from the TypeScript SDK and the pages'
//! scripts), so `imgw serve --web` works from any directory and `cargo build` needs no Node.
//!
//! The pages' origin (`http://ADMIN_HOST:ADMIN_PORT`) is added to the WebSocket listener's
//! `Origin` allow-list at start ([`page_origins`]), so `--web` needs no `--allowed-origin`.
//! They are public (no admin token): static files of the open-source build and the listener's
//! address. What they do needs its own credentials: the chat page a user's token, the
//! dashboard the admin token for `/metrics` when one is set.

use std::net::{IpAddr, SocketAddr};

/// One embedded file: its URL path, content type and body.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

const ASSETS: &[Asset] = &[
    Asset {
        path: "/chat",
        content_type: HTML,
        body: include_str!("../clients/js/pages/chat.html"),
    },
    Asset {
        path: "/dashboard",
        content_type: HTML,
        body: include_str!("../clients/js/pages/dashboard.html"),
    },
    Asset {
        path: "/web/style.css",
        content_type: CSS,
        body: include_str!("../clients/js/pages/style.css"),
    },
    // The SDK, which the chat page's script imports as "../index.js".
    Asset {
        path: "/web/index.js",
        content_type: JS,
        body: include_str!("../clients/js/dist/index.js"),
    },
    Asset {
        path: "/web/pages/chat.js",
        content_type: JS,
        body: include_str!("../clients/js/dist/pages/chat.js"),
    },
    Asset {
        path: "/web/pages/dashboard.js",
        content_type: JS,
        body: include_str!("../clients/js/dist/pages/dashboard.js"),
    },
];

/// What `/web/config.json` reports.
#[derive(Clone, Debug)]
pub struct WebConfig {
    /// The WebSocket upgrade path (`ws.path`).
    pub ws_path: String,
    /// Whether `--insecure-dev-auth` is on (the chat page then takes the user id as token).
    pub dev_auth: bool,
}

/// An answer of the web routes: status, content type, body.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// Serves `path` (a query string ignored) if it is one of the web routes; `None` otherwise.
/// `admin` is the admin listener's address, `ws` the WebSocket listener's once bound.
pub fn route(
    method: &str,
    path: &str,
    cfg: &WebConfig,
    admin: SocketAddr,
    ws: Option<SocketAddr>,
) -> Option<Page> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let known = path == "/web/config.json" || ASSETS.iter().any(|a| a.path == path);
    if !known {
        return None;
    }
    if !matches!(method, "GET" | "HEAD") {
        return Some(Page {
            status: 405,
            content_type: "text/plain; charset=utf-8",
            body: "method not allowed\n".into(),
        });
    }
    if path == "/web/config.json" {
        return Some(match ws {
            Some(ws) => Page {
                status: 200,
                content_type: "application/json",
                body: config_json(cfg, admin, ws),
            },
            None => Page {
                status: 503,
                content_type: "application/json",
                body: "{\"error\":\"the WebSocket listener is not bound yet\"}\n".into(),
            },
        });
    }
    ASSETS.iter().find(|a| a.path == path).map(|a| Page {
        status: 200,
        content_type: a.content_type,
        body: a.body.to_owned(),
    })
}

/// `{"ws_host": HOST or null, "ws_port": PORT, "ws_path": PATH, "dev_auth": BOOL}`.
/// `ws_host` is null when the page should use its own host name (the WebSocket listener is on
/// every address, or on the admin's): the name the browser used for the admin port reaches
/// it, and the `Origin` then matches ([`page_origins`]).
pub fn config_json(cfg: &WebConfig, admin: SocketAddr, ws: SocketAddr) -> String {
    let same_host = ws.ip().is_unspecified() || ws.ip() == admin.ip();
    let host = (!same_host).then(|| match ws.ip() {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    });
    let v = serde_json::json!({
        "ws_host": host,
        "ws_port": ws.port(),
        "ws_path": cfg.ws_path,
        "dev_auth": cfg.dev_auth,
    });
    format!("{v}\n")
}

/// The origins a browser sends for pages served from the admin listener at `admin`:
/// `http://IP:PORT`, with `localhost` too for a loopback address. For an address on every
/// interface (0.0.0.0, ::) only the loopback names are known here: a page opened through
/// another name needs `--allowed-origin http://NAME:PORT`.
pub fn page_origins(admin: SocketAddr) -> Vec<String> {
    // A browser leaves out the scheme's default port.
    let port = match admin.port() {
        80 => String::new(),
        p => format!(":{p}"),
    };
    let host = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => format!("http://[{v6}]{port}"),
        IpAddr::V4(v4) => format!("http://{v4}{port}"),
    };
    let ip = admin.ip();
    let mut out = Vec::new();
    if ip.is_unspecified() {
        out.push(host(IpAddr::from([127, 0, 0, 1])));
        out.push(host(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)));
    } else {
        out.push(host(ip));
    }
    if ip.is_loopback() || ip.is_unspecified() {
        out.push(format!("http://localhost{port}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WebConfig {
        WebConfig {
            ws_path: "/ws".into(),
            dev_auth: true,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pages_and_scripts_are_embedded() {
        let admin = addr("127.0.0.1:9090");
        for (path, kind, needle) in [
            ("/chat", HTML, "/web/pages/chat.js"),
            ("/dashboard", HTML, "/web/pages/dashboard.js"),
            ("/web/pages/chat.js", JS, "../index.js"),
            ("/web/index.js", JS, "class Client"),
            ("/web/pages/dashboard.js", JS, "/metrics"),
            ("/web/style.css", CSS, "body"),
        ] {
            let p = route("GET", path, &cfg(), admin, None).unwrap();
            assert_eq!((p.status, p.content_type), (200, kind), "{path}");
            assert!(p.body.contains(needle), "{path} lacks {needle}");
        }
        // The query string is ignored; other paths are not web routes; writes are refused.
        assert_eq!(
            route("GET", "/chat?u=1", &cfg(), admin, None)
                .unwrap()
                .status,
            200
        );
        assert!(route("GET", "/chat/x", &cfg(), admin, None).is_none());
        assert!(route("GET", "/metrics", &cfg(), admin, None).is_none());
        assert_eq!(
            route("POST", "/chat", &cfg(), admin, None).unwrap().status,
            405
        );
    }

    #[test]
    fn config_names_the_ws_listener() {
        let admin = addr("127.0.0.1:9090");
        let r = route("GET", "/web/config.json", &cfg(), admin, None).unwrap();
        assert_eq!(r.status, 503, "not bound yet");
        let r = route(
            "GET",
            "/web/config.json",
            &cfg(),
            admin,
            Some(addr("127.0.0.1:8080")),
        );
        let v: serde_json::Value = serde_json::from_str(&r.unwrap().body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ws_host": null, "ws_port": 8080, "ws_path": "/ws", "dev_auth": true})
        );
        let other = config_json(&cfg(), admin, addr("10.0.0.5:8080"));
        assert!(other.contains("\"ws_host\":\"10.0.0.5\""), "{other}");
        let any = config_json(&cfg(), admin, addr("0.0.0.0:8080"));
        assert!(any.contains("\"ws_host\":null"), "{any}");
        let v6 = config_json(&cfg(), admin, addr("[fd00::1]:8080"));
        assert!(v6.contains("\"ws_host\":\"[fd00::1]\""), "{v6}");
    }

    #[test]
    fn origins_of_the_pages() {
        assert_eq!(
            page_origins(addr("127.0.0.1:9090")),
            ["http://127.0.0.1:9090", "http://localhost:9090"]
        );
        assert_eq!(
            page_origins(addr("[::1]:9091")),
            ["http://[::1]:9091", "http://localhost:9091"]
        );
        assert_eq!(
            page_origins(addr("10.0.0.5:8000")),
            ["http://10.0.0.5:8000"]
        );
        assert_eq!(page_origins(addr("10.0.0.5:80")), ["http://10.0.0.5"]);
        assert_eq!(
            page_origins(addr("0.0.0.0:9090")),
            [
                "http://127.0.0.1:9090",
                "http://[::1]:9090",
                "http://localhost:9090"
            ]
        );
    }
}
