#![allow(clippy::unwrap_used)]

//! The client against a scripted fake daemon.

use futures_util::{SinkExt, StreamExt};
use gpuctl_protocol::*;
use tokio::net::UnixListener;
use tokio_util::codec::Framed;

type DaemonConn = Framed<tokio::net::UnixStream, FrameCodec<ClientMessage, DaemonMessage>>;

fn welcome() -> DaemonMessage {
    DaemonMessage::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        daemon_version: "test".into(),
        capabilities: vec![],
    })
}

async fn fake_daemon<F, Fut>(script: F) -> (tempfile::TempDir, std::path::PathBuf)
where
    F: FnOnce(DaemonConn) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        script(Framed::new(stream, FrameCodec::default())).await;
    });
    (dir, path)
}

async fn expect_hello(conn: &mut DaemonConn) {
    match conn.next().await {
        Some(Ok(ClientMessage::Hello(hello))) => assert_eq!(hello.protocol, PROTOCOL_VERSION),
        other => panic!("expected Hello, got {other:?}"),
    }
}

async fn next_request(conn: &mut DaemonConn) -> (u64, Request) {
    match conn.next().await {
        Some(Ok(ClientMessage::Request { id, request })) => (id, request),
        other => panic!("expected a request, got {other:?}"),
    }
}

#[tokio::test]
async fn calls_in_flight_are_matched_by_id_and_events_are_streamed() {
    let (_dir, path) = fake_daemon(|mut conn| async move {
        expect_hello(&mut conn).await;
        conn.send(welcome()).await.unwrap();
        let (first, _) = next_request(&mut conn).await;
        let (second, _) = next_request(&mut conn).await;
        // Answer out of order, with events for the first.
        conn.send(DaemonMessage::Response {
            id: second,
            response: Response::Ping(PingResponse {}),
        })
        .await
        .unwrap();
        for done in 1..=2 {
            let event = Event::Progress(ProgressEvent {
                done,
                total: 2,
                message: String::new(),
                elapsed_ms: 0,
                eta_ms: None,
            });
            conn.send(DaemonMessage::Event { id: first, event })
                .await
                .unwrap();
        }
        let error = Error::new(ErrorCode::NotFound, "no such model");
        conn.send(DaemonMessage::Error { id: first, error })
            .await
            .unwrap();
        let _ = conn.next().await;
    })
    .await;

    let client = Client::connect(&path).await.unwrap();
    assert_eq!(client.welcome().daemon_version, "test");
    let mut first = client
        .start(Request::Status(StatusRequest {}))
        .await
        .unwrap();
    let second = client.start(Request::Ping(PingRequest {})).await.unwrap();
    assert_ne!(first.id(), second.id());
    assert_eq!(
        second.response().await.unwrap(),
        Response::Ping(PingResponse {})
    );
    let mut progress = vec![];
    while let Some(Event::Progress(p)) = first.event().await {
        progress.push(p.done);
    }
    assert_eq!(progress, vec![1, 2]);
    match first.response().await {
        Err(ClientError::Daemon(error)) => assert_eq!(error.code, ErrorCode::NotFound),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn an_incompatible_daemon_is_reported_at_connect() {
    let (_dir, path) = fake_daemon(|mut conn| async move {
        expect_hello(&mut conn).await;
        let error = Error::new(
            ErrorCode::Incompatible,
            "client speaks 1.0, daemon speaks 2.0",
        );
        conn.send(DaemonMessage::Closing(error)).await.unwrap();
    })
    .await;
    match Client::connect(&path).await {
        Err(ClientError::Rejected(error)) => assert_eq!(error.code, ErrorCode::Incompatible),
        Err(other) => panic!("expected Rejected, got {other}"),
        Ok(_) => panic!("expected Rejected, got a client"),
    }
}

#[tokio::test]
async fn pending_calls_fail_with_the_closing_reason() {
    let (_dir, path) = fake_daemon(|mut conn| async move {
        expect_hello(&mut conn).await;
        conn.send(welcome()).await.unwrap();
        let _ = next_request(&mut conn).await;
        let error = Error::new(ErrorCode::ShuttingDown, "gpuctld is stopping");
        conn.send(DaemonMessage::Closing(error)).await.unwrap();
    })
    .await;
    let client = Client::connect(&path).await.unwrap();
    match client.call(Request::Status(StatusRequest {})).await {
        Err(ClientError::Closed {
            reason: Some(error),
        }) => assert_eq!(error.code, ErrorCode::ShuttingDown),
        other => panic!("expected Closed(ShuttingDown), got {other:?}"),
    }
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    match Client::connect(&path).await {
        Err(error @ ClientError::Connect { .. }) => {
            assert!(error.to_string().contains("absent.sock"), "{error}")
        }
        Err(other) => panic!("expected Connect, got {other}"),
        Ok(_) => panic!("connected to nothing"),
    }
}
