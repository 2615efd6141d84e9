//! Bad input closes the offending connection only; another client is then
//! served as usual.

use gpuctl_protocol::{ErrorCode, Hello, PingRequest, ProtocolVersion, Request, StatusRequest};

use crate::fixture::*;

#[test]
fn garbage_bytes() {
    let daemon = Daemon::start("");
    let mut client = RawClient::connect(&daemon.socket);
    client.send_bytes(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let message = client.expect_closing(ErrorCode::FrameTooLarge);
    assert!(message.contains("maximum of 16777216 bytes"), "{message}");
    daemon.assert_serving();
}

#[test]
fn a_4_gib_length_prefix() {
    let daemon = Daemon::start("");
    let mut client = RawClient::handshaken(&daemon.socket);
    client.send_bytes(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    client.expect_closing(ErrorCode::FrameTooLarge);
    daemon.assert_serving();
}

#[test]
fn a_prefix_over_the_configured_limit() {
    let daemon = Daemon::start("[daemon]\nmax_frame = \"2MiB\"\n");
    let mut client = RawClient::handshaken(&daemon.socket);
    client.send_bytes(&((2 << 20) + 1u32).to_be_bytes());
    let message = client.expect_closing(ErrorCode::FrameTooLarge);
    assert!(message.contains("2097152"), "{message}");
    daemon.assert_serving();
}

#[test]
fn a_truncated_frame() {
    let daemon = Daemon::start("");
    let mut client = RawClient::handshaken(&daemon.socket);
    client.send_bytes(&[0, 0, 0, 100, 1, 2, 3]);
    client.stream.shutdown(std::net::Shutdown::Write).unwrap();
    client.expect_closing(ErrorCode::MalformedFrame);
    daemon.assert_serving();
}

#[test]
fn an_unknown_message() {
    let daemon = Daemon::start("");
    let mut client = RawClient::handshaken(&daemon.socket);
    // ClientMessage::Request { id: 1, request: variant 99 }
    let mut payload = 1u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&1u64.to_le_bytes());
    payload.extend_from_slice(&99u32.to_le_bytes());
    client.send_frame(&payload);
    client.expect_closing(ErrorCode::MalformedFrame);
    daemon.assert_serving();
}

#[test]
fn a_wrong_protocol_version() {
    let daemon = Daemon::start("");
    let mut client = RawClient::connect(&daemon.socket);
    let hello = Hello {
        protocol: ProtocolVersion {
            major: 99,
            minor: 3,
        },
        client: "future".into(),
    };
    client.send(&gpuctl_protocol::ClientMessage::Hello(hello));
    let message = client.expect_closing(ErrorCode::Incompatible);
    assert!(
        message.contains("99.3") && message.contains("1.0"),
        "{message}"
    );
    daemon.assert_serving();
}

#[test]
fn a_request_before_hello_and_a_second_hello() {
    let daemon = Daemon::start("");
    let mut client = RawClient::connect(&daemon.socket);
    client.request(1, Request::Ping(PingRequest {}));
    let message = client.expect_closing(ErrorCode::InvalidRequest);
    assert!(message.contains("first frame must be Hello"), "{message}");

    let mut client = RawClient::handshaken(&daemon.socket);
    client.send(&gpuctl_protocol::ClientMessage::Hello(Hello {
        protocol: gpuctl_protocol::PROTOCOL_VERSION,
        client: "again".into(),
    }));
    client.expect_closing(ErrorCode::InvalidRequest);
    daemon.assert_serving();
}

#[test]
fn a_silent_connection_is_closed_after_the_handshake_timeout() {
    let daemon = Daemon::start("[daemon]\nhandshake_timeout = \"300ms\"\n");
    let mut client = RawClient::connect(&daemon.socket);
    let message = client.expect_closing(ErrorCode::Timeout);
    assert!(message.contains("no Hello within"), "{message}");
    daemon.assert_serving();
}

#[test]
fn connections_over_the_limit_are_refused_with_busy() {
    let daemon = Daemon::start("[daemon]\nmax_connections = 2\n");
    daemon.wait_idle();
    let mut first = RawClient::handshaken(&daemon.socket);
    let _second = RawClient::handshaken(&daemon.socket);
    let mut third = RawClient::connect(&daemon.socket);
    let message = third.expect_closing(ErrorCode::Busy);
    assert!(message.contains("at most 2 connections"), "{message}");
    let refused = daemon.gpuctl(&["ping"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("busy"), "{}", stderr(&refused));

    // The connections being served are unaffected, and a freed slot is reused.
    first.request(5, Request::Status(StatusRequest {}));
    assert!(matches!(
        first.receive(),
        Some(gpuctl_protocol::DaemonMessage::Response { id: 5, .. })
    ));
    drop(first);
    wait_until(
        "a freed connection slot",
        std::time::Duration::from_secs(10),
        || daemon.gpuctl(&["ping"]).status.success(),
    );
}
