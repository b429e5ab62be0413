//! The original note's client: send `how are you?` every 2 seconds, print every reply.
//!
//! ```text
//! cargo run --release -- serve --mode reply
//! cargo run --release --example client -- ws://127.0.0.1:9001/
//! ```

use std::time::Duration;

use wsloop::{Client, ClientConfig, ClientEvent};

const EVERY: Duration = Duration::from_secs(2);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "ws://127.0.0.1:9001/".into());
    let mut client = Client::connect(&url, ClientConfig::default())?;
    eprintln!("connected to {url}");
    client.send_text("how are you?")?;
    client.set_timer(EVERY);
    // `next_event` sleeps in poll until a message arrives or the timer is due.
    while let Some(event) = client.next_event(None)? {
        match event {
            ClientEvent::Text(text) => println!("{text}"),
            ClientEvent::Binary(data) => println!("({} bytes)", data.len()),
            ClientEvent::Timer => {
                client.send_text("how are you?")?;
                client.set_timer(EVERY);
            }
            ClientEvent::Closed { code, reason } => {
                eprintln!("server closed the connection: {code} {reason}");
                break;
            }
            _ => {}
        }
    }
    Ok(())
}
