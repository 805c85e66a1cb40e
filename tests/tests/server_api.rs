//! The control-plane API against a real `ferry server` process with its own
//! SQLite file: authentication, authorization (a host touches only itself),
//! registration, the CLI's verbs and exit codes, restarts, and what a
//! malformed request gets.

use std::io::{Read, Write};
use std::path::Path;

use ferry_api::http::Method;
use ferry_api::Client;
use ferry_tests::{expect_code, ferry, ControlServer, Scratch};
use serde_json::{json, Value};

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

fn client(server: &ControlServer, token: Option<&str>) -> Client {
    let ca = std::fs::read(&server.ca).expect("CA");
    Client::new(&server.url, &ca, token.map(str::to_owned)).expect("client")
}

/// Status and JSON body of one call.
fn call(c: &Client, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let resp = c
        .call(
            method,
            path,
            body.map(|b| serde_json::to_vec(&b).expect("json")),
        )
        .expect("call");
    let v = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    (resp.status, v)
}

/// Registers web01, web02 and target site-b; returns their API tokens.
fn setup(server: &ControlServer, dir: &Path) -> (String, String, String) {
    let web01 = server.register("host", "web01", &dir.join("web01"), None);
    let web02 = server.register("host", "web02", &dir.join("web02"), None);
    let site_b = server.register(
        "target",
        "site-b",
        &dir.join("site-b"),
        Some("127.0.0.1:9443"),
    );
    (web01, web02, site_b)
}

#[test]
fn every_call_needs_a_known_token_and_hosts_touch_only_themselves() {
    let dir = Scratch::new("api-auth");
    let server = ControlServer::start(&dir.path(""));
    let (web01, web02, site_b) = setup(&server, &dir.path(""));
    let admin = client(&server, Some(&server.admin_token));
    let h1 = client(&server, Some(&web01));
    let tgt = client(&server, Some(&site_b));

    // Anyone: health and the CA; nothing else.
    assert_eq!(
        call(&client(&server, None), Method::Get, "/v1/health", None).0,
        200
    );
    for (token, why) in [
        (None, "no token"),
        (Some("fya_0000"), "wrong token"),
        (Some(&*"x".repeat(4000)), "oversized token"),
    ] {
        let c = client(&server, token);
        let (status, body) = call(&c, Method::Get, "/v1/hosts", None);
        assert_eq!(status, 401, "{why}: {body}");
        assert_eq!(body["error"]["kind"], "unauthenticated", "{why}");
        let (status, _) = call(
            &c,
            Method::Post,
            "/v1/policies",
            Some(json!({
            "name": "sneaky", "rpo_alert_secs": 1, "retention_secs": 1,
            "crash_interval_secs": 1, "compression_level": 1, "bandwidth": 0})),
        );
        assert_eq!(status, 401, "{why}");
    }

    // The admin records a policy and web02's disks; web01 reports its own.
    assert_eq!(
        call(
            &h1,
            Method::Put,
            "/v1/hosts/web01/disks",
            Some(json!([{"name": "data", "size": 1048576}]))
        )
        .0,
        200
    );
    assert_eq!(
        call(
            &admin,
            Method::Put,
            "/v1/hosts/web02/disks",
            Some(json!([{"name": "db", "size": 2097152}]))
        )
        .0,
        200
    );
    let before_web02 = call(&admin, Method::Get, "/v1/hosts/web02", None).1;
    let before_policies = call(&admin, Method::Get, "/v1/policies", None).1;

    // Host web01 reading or changing host web02, or anything admin: 403.
    let forbidden: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::Get, "/v1/hosts/web02", None),
        (Method::Get, "/v1/hosts", None),
        (Method::Put, "/v1/hosts/web02/disks", Some(json!([]))),
        (
            Method::Post,
            "/v1/hosts/web02/protect",
            Some(json!({"policy": "p", "target": "site-b"})),
        ),
        (
            Method::Post,
            "/v1/hosts/web01/protect",
            Some(json!({"policy": "p", "target": "site-b"})),
        ),
        (
            Method::Post,
            "/v1/policies",
            Some(
                json!({"name": "p", "rpo_alert_secs": 1, "retention_secs": 1,
            "crash_interval_secs": 1, "compression_level": 1, "bandwidth": 0}),
            ),
        ),
        (
            Method::Post,
            "/v1/registration-tokens",
            Some(json!({"role": "host", "ttl_secs": 60})),
        ),
        (Method::Get, "/v1/targets/site-b", None),
        (Method::Post, "/v1/jobs/claim", Some(json!({}))),
        (
            Method::Post,
            "/v1/heartbeat",
            Some(json!({"component": "target"})),
        ),
        (Method::Get, "/v1/jobs", None),
    ];
    for (m, path, body) in forbidden {
        let (status, resp) = call(&h1, m, path, body);
        assert_eq!(status, 403, "web01 {} {path}: {resp}", m.as_str());
        assert_eq!(resp["error"]["kind"], "forbidden");
    }
    // A target is no host.
    assert_eq!(call(&tgt, Method::Get, "/v1/hosts/web01", None).0, 403);
    assert_eq!(
        call(
            &tgt,
            Method::Post,
            "/v1/heartbeat",
            Some(json!({"component": "sidecar"}))
        )
        .0,
        403
    );
    // Nothing changed.
    assert_eq!(
        call(&admin, Method::Get, "/v1/hosts/web02", None).1,
        before_web02
    );
    assert_eq!(
        call(&admin, Method::Get, "/v1/policies", None).1,
        before_policies
    );

    // What each may do.
    let (status, me) = call(&h1, Method::Get, "/v1/hosts/web01", None);
    assert_eq!(status, 200);
    assert_eq!(me["disks"][0]["name"], "data");
    assert_eq!(
        call(
            &client(&server, Some(&web02)),
            Method::Get,
            "/v1/hosts/web02",
            None
        )
        .0,
        200
    );
    assert_eq!(call(&tgt, Method::Get, "/v1/targets/site-b", None).0, 200);
    let (status, hb) = call(
        &h1,
        Method::Post,
        "/v1/heartbeat",
        Some(json!({"component": "filter",
        "disks": [{"name": "data", "size": 1048576}], "status": {"ok": true}})),
    );
    assert_eq!(status, 200, "{hb}");
}

#[test]
fn registration_tokens_are_one_time_bound_and_pinned() {
    let dir = Scratch::new("api-register");
    let server = ControlServer::start(&dir.path(""));
    let t = server.json(&["host", "token", "--name", "web01", "--ttl", "10m"]);
    let token = t["token"].as_str().unwrap();
    let fp = t["ca_fingerprint"].as_str().unwrap();
    let register = |name: &str, fp: &str, state: &str| {
        ferry([
            "host",
            "register",
            "--server",
            &server.url,
            "--token",
            token,
            "--ca-fingerprint",
            fp,
            "--name",
            name,
            "--state",
            dir.path(state).to_str().unwrap(),
        ])
    };
    // A pinned fingerprint that does not match: nothing sent, token intact.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = register("web01", &wrong, "a");
    expect_code(&out, 3, "register against an unpinned CA");
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to trust"));
    // The token is bound to web01.
    expect_code(
        &register("web02", fp, "b"),
        4,
        "register under another name",
    );
    expect_code(&register("web01", fp, "c"), 0, "register");
    for f in [
        "server.json",
        "server.token",
        "credentials/ca.crt",
        "credentials/web01.crt",
        "credentials/web01.key",
        "credentials/web01.datakey",
    ] {
        let meta = std::fs::metadata(dir.path("c").join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o077, 0, "{f} is private");
    }
    assert_eq!(
        std::fs::metadata(dir.path("c/credentials/web01.datakey"))
            .unwrap()
            .len(),
        32
    );
    // Used once.
    expect_code(&register("web01", fp, "d"), 4, "a used token");
    // Registration tokens are no API tokens.
    expect_code(
        &server.cli_as(token, &["host", "list"]),
        4,
        "a registration token as API token",
    );
    // Hosts may not mint tokens; a host's token is refused for admin verbs.
    let web01 = std::fs::read_to_string(dir.path("c/server.token")).unwrap();
    expect_code(
        &server.cli_as(web01.trim(), &["host", "token"]),
        4,
        "host minting tokens",
    );
    // Re-registering (a reinstalled host) keeps the data key, revokes the
    // old API token.
    let again = server.register("host", "web01", &dir.path("e"), None);
    assert_eq!(
        std::fs::read(dir.path("c/credentials/web01.datakey")).unwrap(),
        std::fs::read(dir.path("e/credentials/web01.datakey")).unwrap()
    );
    expect_code(
        &server.cli_as(web01.trim(), &["host", "show", "web01"]),
        4,
        "old host token",
    );
    expect_code(
        &server.cli_as(&again, &["host", "show", "web01"]),
        0,
        "new host token",
    );
    // A target's certificate names the target only: not the address it
    // registered with (a registrant must not pick names that could pass for
    // the server or another target), and it serves only.
    server.register("target", "site-b", &dir.path("t"), Some("10.9.8.7:9443"));
    let out = std::process::Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-ext",
            "subjectAltName,extendedKeyUsage",
            "-in",
        ])
        .arg(dir.path("t/credentials/site-b.crt"))
        .output();
    if let Some(out) = out.ok().filter(|o| o.status.success()) {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("site-b") && !text.contains("10.9.8.7"),
            "{text}"
        );
        assert!(text.contains("TLS Web Server Authentication"), "{text}");
        assert!(!text.contains("TLS Web Client Authentication"), "{text}");
    }
    // One name, one role, lower case, not reserved.
    let try_register = |role: &str, name: &str, bind: bool, state: &str| {
        let mut args = vec![role, "token", "--json"];
        if bind {
            args.extend(["--name", name]);
        }
        let t: Value = serde_json::from_slice(&server.cli(&args).stdout).unwrap();
        let dir_flag = if role == "host" { "--state" } else { "--data" };
        let mut reg = vec![
            role.to_owned(),
            "register".into(),
            "--server".into(),
            server.url.clone(),
            "--token".into(),
            t["token"].as_str().unwrap().to_owned(),
            "--ca-fingerprint".into(),
            t["ca_fingerprint"].as_str().unwrap().to_owned(),
            "--name".into(),
            name.to_owned(),
            dir_flag.into(),
            s(&dir.path(state)),
        ];
        if role == "target" {
            reg.extend(["--address".into(), "127.0.0.1:9".into()]);
        }
        ferry(&reg)
    };
    expect_code(
        &try_register("host", "site-b", true, "x1"),
        6,
        "a host named like a target",
    );
    expect_code(
        &try_register("target", "web01", true, "x2"),
        6,
        "a target named like a host",
    );
    expect_code(
        &try_register("host", "ferry-server", false, "x3"),
        6,
        "the server's name",
    );
    expect_code(&try_register("host", "Web09", false, "x4"), 6, "upper case");
    // Taking over a registered host needs a token bound to its name.
    expect_code(
        &try_register("host", "web01", false, "x5"),
        4,
        "an unbound token for an existing host",
    );
    expect_code(
        &server.cli_as(&again, &["host", "show", "web01"]),
        0,
        "web01 keeps its token",
    );
}

#[test]
fn cli_verbs_print_tables_or_json_and_exit_with_documented_codes() {
    let dir = Scratch::new("api-cli");
    let server = ControlServer::start(&dir.path(""));
    let (web01, _, _) = setup(&server, &dir.path(""));
    // The host's filter reports two disks.
    let out = server.cli_as(&web01, &["host", "show", "web01", "--json"]);
    expect_code(&out, 0, "host show as itself");
    let c = client(&server, Some(&web01));
    call(
        &c,
        Method::Post,
        "/v1/heartbeat",
        Some(json!({"component": "filter",
        "disks": [{"name": "data", "size": 1 << 30}, {"name": "logs", "size": 1 << 20}]})),
    );

    let p = server.json(&[
        "policy",
        "create",
        "gold",
        "--rpo",
        "5m",
        "--retention",
        "3d",
        "--crash-interval",
        "1m",
        "--app-interval",
        "off",
        "--compression-level",
        "-3",
        "--bandwidth",
        "50M",
    ]);
    assert_eq!(
        p,
        json!({"name": "gold", "rpo_alert_secs": 300, "retention_secs": 259200,
        "crash_interval_secs": 60, "app_interval_secs": null, "compression_level": -3,
        "bandwidth": 52428800, "failback": "gold-failback"})
    );
    expect_code(
        &server.cli(&["policy", "create", "gold"]),
        6,
        "a taken policy name",
    );
    expect_code(
        &server.cli(&["policy", "create", "bad", "--compression-level", "99"]),
        6,
        "an invalid policy",
    );
    // gold and the failback policy made with it.
    let names: Vec<_> = server
        .json(&["policy", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    assert_eq!(names, [json!("gold"), json!("gold-failback")]);
    let changed = server.json(&["policy", "set", "gold-failback", "--rpo", "30m"]);
    assert_eq!(changed["rpo_alert_secs"], 1800, "{changed}");
    expect_code(
        &server.cli(&["policy", "set", "silver", "--rpo", "30m"]),
        5,
        "an unknown policy to change",
    );
    expect_code(
        &server.cli(&["policy", "show", "silver"]),
        5,
        "an unknown policy",
    );

    let prot = server.json(&["protect", "web01", "--policy", "gold", "--target", "site-b"]);
    let states: Vec<_> = prot
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["disk"].clone(), p["state"].clone()))
        .collect();
    assert_eq!(
        states,
        [
            (json!("data"), json!("enabling")),
            (json!("logs"), json!("enabling"))
        ]
    );
    expect_code(
        &server.cli(&[
            "protect", "web01", "--policy", "gold", "--target", "nowhere",
        ]),
        5,
        "unknown target",
    );
    expect_code(
        &server.cli(&["protect", "web09", "--policy", "gold", "--target", "site-b"]),
        5,
        "unknown host",
    );

    // The sidecar's reports move the lifecycle.
    call(
        &c,
        Method::Post,
        "/v1/heartbeat",
        Some(json!({"component": "sidecar", "replication": [
        {"disk": "data", "shipping": true, "consistent": false, "resync_bytes": 1000},
        {"disk": "logs", "shipping": true, "consistent": true}]})),
    );
    let st = server.json(&["status", "web01"]);
    let states: Vec<_> = st[0]["protections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["state"].clone())
        .collect();
    assert_eq!(states, [json!("initial-sync"), json!("protected")]);
    let out = server.cli(&["status"]);
    expect_code(&out, 0, "status table");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("initial-sync") && text.contains("web01") && text.contains("HOST"),
        "{text}"
    );

    assert_eq!(server.json(&["target", "list"])[0]["name"], "site-b");
    assert_eq!(server.json(&["job", "list"]), json!([]));
    expect_code(&server.cli(&["job", "show", "42"]), 5, "an unknown job");
    expect_code(
        &server.cli_as("fya_nope", &["host", "list"]),
        4,
        "a wrong token",
    );
    let out = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["host", "list"])
        .env(
            "FERRY_SERVER",
            format!("https://127.0.0.1:{}", ferry_tests::free_port()),
        )
        .env("FERRY_TOKEN", &server.admin_token)
        .env("FERRY_CA", &server.ca)
        .output()
        .unwrap();
    expect_code(&out, 3, "an unreachable server");
}

#[test]
fn state_survives_a_kill_and_restart() {
    let dir = Scratch::new("api-restart");
    let mut server = ControlServer::start(&dir.path(""));
    let (web01, _, _) = setup(&server, &dir.path(""));
    server.json(&["policy", "create", "gold"]);
    server.daemon.kill9();
    server.daemon.restart();
    server.wait_up();
    assert_eq!(server.json(&["host", "list"]).as_array().unwrap().len(), 2);
    assert_eq!(server.json(&["policy", "show", "gold"])["name"], "gold");
    expect_code(
        &server.cli_as(&web01, &["host", "show", "web01"]),
        0,
        "host token after restart",
    );
    // A second init on the same directory is refused.
    let out = ferry(["server", "init", "--data", server.data.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0), "second init refused");
}

#[test]
fn malformed_requests_get_an_error_and_a_closed_connection() {
    let dir = Scratch::new("api-raw");
    let server = ControlServer::start(&dir.path(""));
    let ca = std::fs::read(&server.ca).unwrap();
    let cfg = ferry_protocol::tls::api_client_config(&ca).unwrap();
    let addr = server.url.trim_start_matches("https://");
    let raw = |bytes: &[u8]| -> String {
        let mut s =
            ferry_protocol::tls::connect(addr, cfg.clone(), std::time::Duration::from_secs(10))
                .unwrap();
        s.write_all(bytes).unwrap();
        s.flush().unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let r = raw(b"GARBAGE\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 400") || r.starts_with("HTTP/1.1 405"),
        "{r}"
    );
    let r = raw(b"POST /v1/policies HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    let r = raw(b"POST /v1/policies HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 501"), "{r}");
    let r = raw(b"GET /v1/../etc/passwd HTTP/1.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // Keep-alive: two requests on one connection, then close on request.
    let r = raw(
        b"GET /v1/health HTTP/1.1\r\n\r\nGET /v1/nothing HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.matches("HTTP/1.1 ").count(), 2, "{r}");
    assert!(
        r.contains("HTTP/1.1 401"),
        "unknown paths still need a token first: {r}"
    );
    // Bad JSON bodies are 422, not 500.
    let admin = client(&server, Some(&server.admin_token));
    let resp = admin
        .call(Method::Post, "/v1/policies", Some(b"{not json".to_vec()))
        .unwrap();
    assert_eq!(resp.status, 422);
}
