//! Waiting for a model: queue_max, arrival order across a group, queue positions told to clients.

use super::*;

#[test]
fn a_full_queue_refuses_at_once() {
    let daemon = Daemon::start(&config("queue_max = 1", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let job = start_slow_job(&client, &daemon, 100_000).await;
        let error = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    seed: Some(1),
                    ..request("gen")
                },
            )
            .await,
        );
        assert_eq!(error.code, ErrorCode::QueueFull);
        assert!(
            error.message.contains("policy.queue_max"),
            "{}",
            error.message
        );
        assert!(job.response().await.is_ok());
    });
}

#[test]
fn a_group_serves_its_requests_in_arrival_order() {
    let grouped = config("", "group = \"g\"")
        .replace("kind = \"generate\"", "kind = \"generate\"\ngroup = \"g\"");
    let daemon = Daemon::start(&grouped);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let slow = start_slow_job(&client, &daemon, 400_000).await;
        // While gen is busy: first a request for ten, then one for gen.
        let for_ten = client
            .start(Request::Generate(tensor_request()))
            .await
            .unwrap();
        wait_until("ten's request to queue", Duration::from_secs(10), || {
            model_status(&daemon, "ten")["queued"] == 1
        });
        let for_gen = client
            .start(Request::Generate(GenerateRequest {
                seed: Some(1),
                ..request("gen")
            }))
            .await
            .unwrap();
        assert!(slow.response().await.is_ok());
        assert!(for_ten.response().await.is_ok());
        let Ok(Response::Generate(second)) = for_gen.response().await else {
            panic!("gen's second request failed")
        };
        assert!(
            second.load_ms.is_some(),
            "gen's later request waited for the switch to ten and back"
        );
    });
    assert_eq!(model_status(&daemon, "gen")["loads"], 2);
    assert_eq!(model_status(&daemon, "ten")["loads"], 1);
}

#[test]
fn waiting_clients_are_told_their_place_in_line() {
    use gpuctl_protocol::{Event, QueuedEvent};
    let daemon = Daemon::start(&config("", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let mut first = client
            .start(Request::Generate(slow_request(300_000)))
            .await
            .unwrap();
        match first.event().await {
            Some(Event::Queued(QueuedEvent {
                model,
                position: 1,
                waiting_for,
            })) => {
                assert_eq!(model, "gen");
                assert_eq!(waiting_for, "the model to load");
            }
            other => panic!("expected a queue event, got {other:?}"),
        }
        wait_until("the slow job to run", Duration::from_secs(30), || {
            model_status(&daemon, "gen")["in_flight"] == 1
        });
        let position = |event: Option<Event>| match event {
            Some(Event::Queued(queued)) => queued.position,
            other => panic!("expected a queue event, got {other:?}"),
        };
        // One at a time: requests sent together may reach the queue in any order.
        let mut second = client
            .start(Request::Generate(GenerateRequest {
                seed: Some(1),
                ..request("gen")
            }))
            .await
            .unwrap();
        assert_eq!(position(second.event().await), 1);
        let mut third = client
            .start(Request::Generate(GenerateRequest {
                seed: Some(2),
                ..request("gen")
            }))
            .await
            .unwrap();
        assert_eq!(position(third.event().await), 2);
        assert!(first.response().await.is_ok());
        // The first finished and the second started: the third moved up.
        assert_eq!(position(third.event().await), 1);
        assert!(second.response().await.is_ok());
        assert!(third.response().await.is_ok());
    });
}
