//! The admin API's routes into the shards (docs/ADMIN.md), through the running `imgw serve`
//! binary and real clients: push and kick at durability `memory`, group management, user
//! inspection, broadcast, and the bearer token on every new route.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::gateway::{expect_kicked, http_request, jwt, jwt_gateway, send_group, Gateway};
use imgw::client::{Client, Transport};
use imgw::codec::CodecId;
use imgw::protocol::{Deliver, Envelope, ErrorCode, Message, Ping, PresenceSet, Status, Target};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(400);

fn req(g: &Gateway, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = http_request(g.admin, method, path, body, None).unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// The next `deliver` on `c`.
fn deliver(c: &mut Client) -> Deliver {
    let env = c
        .recv_until(|e| matches!(e.msg, Message::Deliver(_)), WAIT)
        .expect("deliver");
    match env.msg {
        Message::Deliver(d) => d,
        _ => unreachable!(),
    }
}

/// Nothing more is delivered to any of `clients` for a while (no duplicate, nothing
/// unexpected): after [`QUIET`], each is pinged and must answer with nothing but its pong
/// (which also keeps it from idling out: the test configuration's idle timeout is 1.5 s).
fn quiet(clients: &mut [&mut Client]) {
    std::thread::sleep(QUIET);
    for c in clients.iter_mut() {
        let r = c.next_ref();
        c.send(&Envelope::with_ref(Message::Ping(Ping { ts: 1 }), r))
            .unwrap();
        let env = c
            .recv_until(
                |e| e.reference == Some(r) || matches!(e.msg, Message::Deliver(_)),
                WAIT,
            )
            .unwrap();
        assert!(matches!(env.msg, Message::Pong(_)), "unexpected {env:?}");
    }
}

fn members(g: &Gateway, group: &str) -> Vec<String> {
    let (status, v) = req(g, "GET", &format!("/groups/dev/{group}/members"), "");
    assert_eq!(status, 200, "{v}");
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}

fn admin_count(g: &Gateway, path: &str, outcome: &str) -> f64 {
    g.metric(
        "imgw_admin_requests_total",
        &[
            &format!("path=\"{path}\""),
            &format!("outcome=\"{outcome}\""),
        ],
    )
}

#[test]
fn admin_groups_round_trip_and_members_added_online_get_the_messages() {
    let g = Gateway::dev();
    let mut a = g.login(Transport::Ws, CodecId::Json, "ada", "d");
    let mut b = g.login(Transport::Tcp, CodecId::Protobuf, "bob", "d");
    let mut c1 = g.login(Transport::Ws, CodecId::MessagePack, "cyd", "phone");
    let mut c2 = g.login(Transport::Tcp, CodecId::Json, "cyd", "laptop");

    // Create with a duplicate in the list: two members.
    let (status, v) = req(
        &g,
        "POST",
        "/groups",
        r#"{"tenant":"dev","group":"crew","users":["ada","bob","bob"]}"#,
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        (v["changed"].as_u64(), v["members"].as_u64()),
        (Some(2), Some(2))
    );
    let (status, _) = req(
        &g,
        "POST",
        "/groups",
        r#"{"tenant":"dev","group":"crew","users":["zed"]}"#,
    );
    assert_eq!(status, 409, "creating an existing group");
    assert_eq!(members(&g, "crew"), ["ada", "bob"]);

    // A member's message reaches the other member once; cyd is not a member yet.
    let Message::SendAck(ack) = send_group(&mut a, "crew", "m1", "one") else {
        panic!("no send_ack")
    };
    assert_eq!(ack.seq, 1);
    let d = deliver(&mut b);
    assert_eq!((d.body.as_str(), d.from.as_str()), ("one", "ada"));
    assert_eq!(d.to, Some(Target::Group("crew".into())));

    // cyd, online on two devices, is added (ada again is no change) and gets the next
    // message on both devices without joining.
    let (status, v) = req(
        &g,
        "POST",
        "/groups/dev/crew/members",
        r#"{"users":["cyd","ada"]}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["changed"].as_u64(), v["members"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(members(&g, "crew"), ["ada", "bob", "cyd"]);
    assert!(matches!(
        send_group(&mut a, "crew", "m2", "two"),
        Message::SendAck(_)
    ));
    for m in [&mut b, &mut c1, &mut c2] {
        let d = deliver(m);
        assert_eq!((d.body.as_str(), d.inbox_seq), ("two", 2));
    }
    // And may send to it (the sender's own devices get no copy, as for any group send).
    assert!(matches!(
        send_group(&mut c1, "crew", "m3", "three"),
        Message::SendAck(_)
    ));
    for m in [&mut a, &mut b] {
        assert_eq!(deliver(m).body, "three");
    }

    // bob is removed: he gets nothing more; removing him again is a 404.
    let (status, v) = req(&g, "DELETE", "/groups/dev/crew/members/bob", "");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["members"].as_u64(), Some(2));
    assert_eq!(members(&g, "crew"), ["ada", "cyd"]);
    assert_eq!(req(&g, "DELETE", "/groups/dev/crew/members/bob", "").0, 404);
    assert!(matches!(
        send_group(&mut a, "crew", "m4", "four"),
        Message::SendAck(_)
    ));
    for m in [&mut c1, &mut c2] {
        assert_eq!(deliver(m).body, "four");
    }
    assert!(matches!(
        send_group(&mut b, "crew", "m5", "not a member"),
        Message::Error(e) if e.code == ErrorCode::Forbidden
    ));

    // Exactly once per device, nothing to the sender.
    quiet(&mut [&mut a, &mut b, &mut c1, &mut c2]);

    // Delete: the group is gone for the admin and for clients.
    let (status, v) = req(&g, "DELETE", "/groups/dev/crew", "");
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["removed"].as_u64(), v["members"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(req(&g, "GET", "/groups/dev/crew/members", "").0, 404);
    assert_eq!(req(&g, "DELETE", "/groups/dev/crew", "").0, 404);
    assert!(matches!(
        send_group(&mut a, "crew", "m6", "gone"),
        Message::Error(e) if e.code == ErrorCode::NotFound
    ));
    quiet(&mut [&mut a, &mut b, &mut c1, &mut c2]);

    // Bad requests: 400 with a JSON error, unknown groups 404, wrong methods 405.
    for (method, path, body) in [
        ("POST", "/groups", "not json"),
        (
            "POST",
            "/groups",
            r#"{"tenant":"dev","group":"x","users":[]}"#,
        ),
        (
            "POST",
            "/groups",
            r#"{"tenant":"dev","group":"","users":["a"]}"#,
        ),
        (
            "POST",
            "/groups",
            r#"{"tenant":"","group":"x","users":["a"]}"#,
        ),
        (
            "POST",
            "/groups",
            r#"{"tenant":"dev","group":"x","users":[""]}"#,
        ),
        (
            "POST",
            "/groups",
            r#"{"tenant":"dev","group":"x","users":["a"],"more":1}"#,
        ),
        ("POST", "/groups/dev/crew/members", r#"{"users":"ada"}"#),
        ("GET", "/groups/dev/%zz/members", ""),
        ("GET", "/groups/dev/%ff/members", ""),
    ] {
        let (status, v) = req(&g, method, path, body);
        assert_eq!(status, 400, "{method} {path} {body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    let long = "g".repeat(129);
    let (status, _) = req(
        &g,
        "POST",
        "/groups",
        &format!(r#"{{"tenant":"dev","group":"{long}","users":["a"]}}"#),
    );
    assert_eq!(status, 400);
    assert_eq!(
        req(&g, "POST", "/groups/dev/nope/members", r#"{"users":["a"]}"#).0,
        404
    );
    assert_eq!(req(&g, "PUT", "/groups/dev/crew/members", "").0, 405);
    assert_eq!(req(&g, "GET", "/groups", "").0, 405);
    assert_eq!(req(&g, "GET", "/groups/dev/crew/other", "").0, 404);

    // A percent-encoded id is the id.
    let (status, _) = req(
        &g,
        "POST",
        "/groups",
        r#"{"tenant":"dev","group":"a b/c","users":["ada"]}"#,
    );
    assert_eq!(status, 201);
    assert_eq!(members(&g, "a%20b%2Fc"), ["ada"]);

    // Counted: 9 served (2 creates, 1 add, 1 remove, 1 delete, 4 lists) and 15 refused (409,
    // 404 x4, 400 x10); 405s and unknown paths are not counted.
    assert_eq!(admin_count(&g, "/groups", "ok"), 9.0, "{}", g.metrics());
    assert_eq!(
        admin_count(&g, "/groups", "refused"),
        15.0,
        "{}",
        g.metrics()
    );
}

/// A member list at its bound: 1,000 ids of the longest length (256 bytes) in one request is
/// read and applied (a body of about 260 KB); 1,001 ids are refused with 400. (A body past
/// the body bound, 413, is in src/admin.rs's tests.)
#[test]
fn a_member_list_of_a_thousand_longest_ids_fits_one_request() {
    let g = Gateway::dev();
    let ids = |from: usize, n: usize| -> Vec<String> {
        (from..from + n)
            .map(|i| format!("{i:06}{}", "u".repeat(250)))
            .collect()
    };
    let body = serde_json::json!({"tenant": "dev", "group": "big", "users": ids(0, 1000)});
    let (status, v) = req(&g, "POST", "/groups", &body.to_string());
    assert_eq!(status, 201, "{v}");
    let body = serde_json::json!({"users": ids(1000, 1000)});
    let (status, v) = req(&g, "POST", "/groups/dev/big/members", &body.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(members(&g, "big").len(), 2000);
    let body = serde_json::json!({"users": ids(2000, 1001)});
    let (status, _) = req(&g, "POST", "/groups/dev/big/members", &body.to_string());
    assert_eq!(status, 400);
    assert_eq!(members(&g, "big").len(), 2000);
}

#[test]
fn admin_user_inspection_shows_each_device_with_its_shard_transport_and_presence() {
    let g = Gateway::dev();
    let mut phone = g.login(Transport::Ws, CodecId::Json, "ivy", "phone");
    let laptop = g.login(Transport::Tcp, CodecId::Protobuf, "ivy", "laptop");
    let _other = g.login(Transport::Tcp, CodecId::Json, "ike", "phone");

    let (status, v) = req(&g, "GET", "/users/dev/ivy", "");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "online");
    assert!(v["node"].is_null(), "not a cluster node: {v}");
    assert_eq!(
        (v["tenant"].as_str(), v["user"].as_str()),
        (Some("dev"), Some("ivy"))
    );
    let devices: BTreeSet<(String, String, String)> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert!(d["shard"].as_u64().unwrap() < 2, "{d}");
            let s = |k: &str| d[k].as_str().unwrap().to_string();
            (s("device"), s("transport"), s("codec"))
        })
        .collect();
    let want: BTreeSet<(String, String, String)> =
        [("laptop", "tcp", "protobuf"), ("phone", "ws", "json")]
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
    assert_eq!(devices, want);
    assert_eq!(v["devices"].as_array().unwrap().len(), 2, "{v}");

    // Presence follows the user's status.
    let r = phone.next_ref();
    phone
        .send(&Envelope::with_ref(
            Message::PresenceSet(PresenceSet {
                status: Status::Busy,
            }),
            r,
        ))
        .unwrap();
    phone.recv_until(|e| e.reference == Some(r), WAIT).unwrap();
    // `ok` means the user's owner shard was handed the status, which it applies in its next
    // pass; the admin view reads the owner, so it may need that pass (docs/PROTOCOL.md).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = req(&g, "GET", "/users/dev/ivy", "").1;
        if v["status"] == "busy" {
            break;
        }
        assert_eq!(v["status"], "online", "{v}");
        assert!(std::time::Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A device that left is no longer listed.
    drop(laptop);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = req(&g, "GET", "/users/dev/ivy", "").1;
        if v["devices"].as_array().unwrap().len() == 1 {
            assert_eq!(v["devices"][0]["device"], "phone");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nobody: offline, no devices; another tenant's user of the same id is not this one.
    for path in ["/users/dev/nobody", "/users/other/ivy"] {
        let (status, v) = req(&g, "GET", path, "");
        assert_eq!(status, 200);
        assert_eq!(v["status"], "offline", "{path}");
        assert_eq!(v["devices"].as_array().unwrap().len(), 0, "{path}");
    }
    assert_eq!(req(&g, "GET", "/users/dev", "").0, 404);
    assert_eq!(req(&g, "POST", "/users/dev/ivy", "").0, 405);
    assert_eq!(req(&g, "GET", "/users/dev/%", "").0, 400);
    // The polls above make the served count vary; the one bad id is the only refusal.
    assert!(admin_count(&g, "/users", "ok") >= 5.0);
    assert_eq!(admin_count(&g, "/users", "refused"), 1.0);
}

#[test]
fn admin_broadcast_reaches_each_online_device_of_the_tenant_once_and_no_other_tenant() {
    let g = jwt_gateway("");
    let login = |tenant: &str, user: &str, device: &str, t: Transport, codec: CodecId| {
        let mut c = g.client(t, codec);
        c.hello(&jwt(tenant, user), device).unwrap();
        c
    };
    let mut acme = vec![
        login("acme", "u1", "phone", Transport::Ws, CodecId::Json),
        login("acme", "u1", "laptop", Transport::Tcp, CodecId::Protobuf),
        login("acme", "u2", "d", Transport::Tcp, CodecId::MessagePack),
        login("acme", "u3", "d", Transport::Ws, CodecId::FlatBuffers),
        login("acme", "u4", "d", Transport::Tcp, CodecId::Json),
        login("acme", "u5", "d", Transport::Ws, CodecId::Protobuf),
    ];
    // The other tenant has a user of the same id.
    let mut others = [
        login("globex", "u1", "phone", Transport::Ws, CodecId::Json),
        login("globex", "u9", "d", Transport::Tcp, CodecId::Json),
    ];
    let before = g.metric("imgw_admin_broadcast_deliveries_total", &[]);
    let (status, v) = req(
        &g,
        "POST",
        "/broadcast",
        r#"{"tenant":"acme","body":"maintenance at noon","kind":"notice"}"#,
    );
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["shards"].as_u64(), Some(2), "{v}");
    for c in &mut acme {
        let d = deliver(c);
        assert_eq!(d.body, "maintenance at noon");
        assert_eq!(d.kind.as_deref(), Some("notice"));
        assert_eq!(d.from, "system");
    }
    let mut all: Vec<&mut Client> = acme.iter_mut().chain(others.iter_mut()).collect();
    quiet(&mut all);
    let after = g.metric("imgw_admin_broadcast_deliveries_total", &[]);
    assert_eq!(after - before, acme.len() as f64);

    for bad in [
        "{}",
        "not json",
        r#"{"tenant":"","body":"x"}"#,
        r#"{"tenant":"acme"}"#,
        r#"{"tenant":"acme","body":"x","to":"u1"}"#,
    ] {
        let (status, v) = req(&g, "POST", "/broadcast", bad);
        assert_eq!(status, 400, "{bad}: {v}");
    }
    assert_eq!(req(&g, "GET", "/broadcast", "").0, 405);
    assert_eq!(admin_count(&g, "/broadcast", "queued"), 1.0);
    assert_eq!(admin_count(&g, "/broadcast", "refused"), 5.0);
}

/// Durability `memory` has no I/O core: push and kick go through the admin queues. A push
/// reaches the online devices (nothing is kept for an offline user); a kick closes every
/// device of the user and no one else's.
#[test]
fn admin_push_and_kick_work_at_durability_memory() {
    let g = Gateway::dev();
    let mut phone = g.login(Transport::Ws, CodecId::Json, "pat", "phone");
    let mut laptop = g.login(Transport::Tcp, CodecId::Protobuf, "pat", "laptop");
    let mut other = g.login(Transport::Tcp, CodecId::MessagePack, "quin", "phone");

    let (status, v) = req(
        &g,
        "POST",
        "/push",
        r#"{"tenant":"dev","user":"pat","type":"promo","body":"sale","from":"shop","id":"p1"}"#,
    );
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["id"], "p1");
    for c in [&mut phone, &mut laptop] {
        let d = deliver(c);
        assert_eq!(
            (
                d.body.as_str(),
                d.from.as_str(),
                d.kind.as_deref(),
                d.inbox_seq
            ),
            ("sale", "shop", Some("promo"), 1)
        );
    }
    quiet(&mut [&mut phone, &mut laptop, &mut other]);
    // To an offline user: accepted, kept nowhere.
    assert_eq!(
        req(
            &g,
            "POST",
            "/push",
            r#"{"tenant":"dev","user":"gone","body":"x"}"#
        )
        .0,
        202
    );
    // To a group: its online members.
    let (status, _) = req(
        &g,
        "POST",
        "/groups",
        r#"{"tenant":"dev","group":"fans","users":["quin"]}"#,
    );
    assert_eq!(status, 201);
    let (status, _) = req(
        &g,
        "POST",
        "/push",
        r#"{"tenant":"dev","group":"fans","body":"news"}"#,
    );
    assert_eq!(status, 202);
    let d = deliver(&mut other);
    assert_eq!((d.body.as_str(), d.from.as_str()), ("news", "system"));
    assert_eq!(d.to, Some(Target::Group("fans".into())));
    quiet(&mut [&mut phone, &mut laptop, &mut other]);
    assert_eq!(
        g.metric("imgw_admin_memory_pushes_delivered_total", &[]),
        2.0,
        "the push to the offline user reached nobody"
    );

    let (status, v) = req(&g, "POST", "/kick", r#"{"tenant":"dev","user":"pat"}"#);
    assert_eq!(status, 202, "{v}");
    for c in [&mut phone, &mut laptop] {
        expect_kicked(c);
    }
    // quin is untouched.
    quiet(&mut [&mut other]);
    assert_eq!(admin_count(&g, "/push", "queued"), 3.0);
    assert_eq!(admin_count(&g, "/kick", "queued"), 1.0);
}

/// With an admin token, every new route answers 401 without it (or with a wrong one), and
/// serves with it.
#[test]
fn admin_token_guards_the_new_routes() {
    let token = "admin-token-0123456789abcdef";
    let g = Gateway::start_with_env(
        common::gateway::DEV_TOML,
        &[
            "--shards",
            "2",
            "--insecure-dev-auth",
            "--admin-token-env",
            "IMGW_TEST_ADMIN_TOKEN",
        ],
        &[("IMGW_TEST_ADMIN_TOKEN", token)],
    );
    let routes = [
        (
            "POST",
            "/groups",
            r#"{"tenant":"dev","group":"g","users":["a"]}"#,
        ),
        ("GET", "/groups/dev/g/members", ""),
        ("POST", "/groups/dev/g/members", r#"{"users":["b"]}"#),
        ("DELETE", "/groups/dev/g/members/b", ""),
        ("DELETE", "/groups/dev/g", ""),
        ("GET", "/users/dev/a", ""),
        ("POST", "/broadcast", r#"{"tenant":"dev","body":"x"}"#),
        ("POST", "/push", r#"{"tenant":"dev","user":"a","body":"x"}"#),
        ("POST", "/kick", r#"{"tenant":"dev","user":"a"}"#),
    ];
    for (method, path, body) in routes {
        for bearer in [None, Some("wrong-token-0123456789abcd")] {
            let (status, _) = http_request(g.admin, method, path, body, bearer).unwrap();
            assert_eq!(status, 401, "{method} {path} with {bearer:?}");
        }
    }
    // Nothing happened: the group does not exist. With the token, everything is served.
    let with = |method: &str, path: &str, body: &str| {
        http_request(g.admin, method, path, body, Some(token))
            .unwrap()
            .0
    };
    assert_eq!(with("GET", "/groups/dev/g/members", ""), 404);
    let want = [201, 200, 200, 200, 200, 200, 202, 202, 202];
    for ((method, path, body), want) in routes.iter().zip(want) {
        assert_eq!(with(method, path, body), want, "{method} {path}");
    }
    let (_, metrics) = http_request(g.admin, "GET", "/metrics", "", Some(token)).unwrap();
    let refused = 2 * routes.len();
    assert!(
        metrics.contains(&format!("imgw_admin_unauthorized_total {refused}\n")),
        "{metrics}"
    );
}

/// At durability `local` group management goes through the store: the changes are stored
/// before the answer, and the stored member list is what the group owner reads back after a
/// restart.
#[test]
fn admin_groups_at_durability_local_are_stored() {
    let mut g = Gateway::local();
    let (status, v) = req(
        &g,
        "POST",
        "/groups",
        r#"{"tenant":"dev","group":"ops","users":["ola","pia","pia"]}"#,
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        (v["changed"].as_u64(), v["refused"].as_u64()),
        (Some(2), Some(0))
    );
    let (status, v) = req(
        &g,
        "POST",
        "/groups/dev/ops/members",
        r#"{"users":["ron"]}"#,
    );
    assert_eq!((status, v["members"].as_u64()), (200, Some(3)), "{v}");
    assert_eq!(req(&g, "DELETE", "/groups/dev/ops/members/pia", "").0, 200);
    assert_eq!(members(&g, "ops"), ["ola", "ron"]);

    // After a SIGKILL and restart the owner reads the stored members back, and they get the messages.
    g.kill9();
    g.spawn();
    assert_eq!(members(&g, "ops"), ["ola", "ron"]);
    let mut ola = g.login(Transport::Ws, CodecId::Json, "ola", "d");
    let mut ron = g.login(Transport::Tcp, CodecId::Protobuf, "ron", "d");
    assert!(matches!(
        send_group(&mut ola, "ops", "s1", "stored"),
        Message::SendAck(_)
    ));
    assert_eq!(deliver(&mut ron).body, "stored");
    quiet(&mut [&mut ola, &mut ron]);
    assert_eq!(req(&g, "DELETE", "/groups/dev/ops", "").1["removed"], 2);
    assert_eq!(req(&g, "GET", "/groups/dev/ops/members", "").0, 404);
}

/// `POST /kick` of the dev tenant's `user`, accepted.
fn kick(g: &Gateway, user: &str) {
    let body = format!(r#"{{"tenant":"dev","user":"{user}"}}"#);
    let (status, v) = req(g, "POST", "/kick", &body);
    assert_eq!(status, 202, "{v}");
}

/// A kicked client that is still writing when the gateway closes reads its `goaway` and an
/// orderly end of stream, and none of its writes fail meanwhile: the gateway shuts its own
/// side after the last frame and reads (and drops) what the client still sends, instead of
/// closing with unread input, which resets the connection. Over WebSocket the client's
/// close frame answers the gateway's without a reset as well.
#[test]
fn a_client_still_writing_when_kicked_gets_its_goaway_and_an_orderly_close() {
    let g = Gateway::dev();
    for (i, transport) in [Transport::Tcp, Transport::Ws].into_iter().enumerate() {
        let user = format!("writer-{i}");
        let mut c = g.login(transport, CodecId::Json, &user, "d");
        kick(&g, &user);
        // Keep writing for 600 ms without reading: the close happens meanwhile.
        for n in 0..60 {
            let ping = Envelope::new(Message::Ping(Ping { ts: n }));
            if let Err(e) = c.send(&ping) {
                panic!("{transport:?}: write {n} after the kick failed: {e}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        expect_kicked(&mut c);
    }
}

/// `limits.max_lingering_closes` bounds the sockets of a shard in their lingering close: with
/// one allowed, a second kicked client's close does not linger (its writes soon fail) and is
/// counted, while the first still gets its orderly close.
#[test]
fn lingering_closes_are_bounded_per_shard() {
    use imgw::client::ClientError;
    let toml = common::gateway::DEV_TOML.replace(
        "max_frame_bytes = 4096",
        "max_frame_bytes = 4096\nmax_lingering_closes = 1",
    );
    let g = Gateway::start(&toml, &["--shards", "1", "--insecure-dev-auth"]);
    let mut a = g.login(Transport::Tcp, CodecId::Json, "linger-a", "d");
    let mut b = g.login(Transport::Tcp, CodecId::Json, "linger-b", "d");
    kick(&g, "linger-a");
    // a reads its goaway and keeps its side open: its socket lingers on the gateway.
    a.recv_until(|e| matches!(e.msg, Message::Goaway(_)), WAIT)
        .expect("a's goaway");
    kick(&g, "linger-b");
    let failed = (0..60).any(|n| {
        std::thread::sleep(Duration::from_millis(10));
        b.send(&Envelope::new(Message::Ping(Ping { ts: n })))
            .is_err()
    });
    assert!(failed, "b's close lingered past the bound");
    assert_eq!(g.metric("imgw_closes_not_lingered_total", &[]), 1.0);
    let end = a.recv_until(|_| false, WAIT);
    assert!(matches!(end, Err(ClientError::Closed { .. })), "{end:?}");
}
