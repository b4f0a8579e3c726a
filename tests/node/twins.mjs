// Twins through the official Node SDK: prints what its own accumulator made of each form.
// Usage: node twins.mjs <base URL ending in /v1>
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "sk-node-twins", maxRetries: 0 });
const ask = (prompt) => ({ model: "gpt-4o-audio-preview", messages: [{ role: "user", content: prompt }] });
const out = {};

// A stream (with its usage) stored first, then asked for whole.
{
  const stream = client.chat.completions.stream({ ...ask("node s->j"), stream_options: { include_usage: true } });
  await stream.finalChatCompletion();
  const { data, response } = await client.chat.completions.create(ask("node s->j")).withResponse();
  out.stream_to_json = { status: response.headers.get("x-cache-status"), completion: data };
}

// A JSON answer stored first, then asked for as a stream.
{
  await client.chat.completions.create(ask("node j->s"));
  const stream = client.chat.completions.stream({ ...ask("node j->s"), stream_options: { include_usage: true } });
  const completion = await stream.finalChatCompletion();
  const { response } = await client.chat.completions
    .create({ ...ask("node j->s"), stream: true, stream_options: { include_usage: true } }).withResponse();
  // (the helper hides the response: the same request again shows the label it gets)
  out.json_to_stream = { status: response.headers.get("x-cache-status"), completion };
}
console.log(JSON.stringify(out));
