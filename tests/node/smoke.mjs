// The official Node SDK through the proxy: prints one JSON object with what it saw.
// Usage: node smoke.mjs <base URL ending in /v1>
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "sk-node-test", maxRetries: 0 });
const out = {};
const chat = { model: "gpt-4o-mini", messages: [{ role: "user", content: "node persona" }] };

for (const step of ["first", "second"]) {
  const { data, response } = await client.chat.completions.create(chat).withResponse();
  out[`chat_${step}`] = { status: response.headers.get("x-cache-status"), id: data.id,
                          text: data.choices[0].message.content };
}

for (const step of ["first", "second"]) {
  const stream = await client.chat.completions.create({
    ...chat, stream: true, stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  out[`stream_${step}`] = { text, usage };
}

for (const step of ["first", "second"]) {
  const stream = client.responses.stream({ model: "gpt-4.1", input: "node responses" });
  let deltas = "";
  stream.on("response.output_text.delta", (e) => { deltas += e.delta; });
  const final = await stream.finalResponse();
  out[`responses_${step}`] = { deltas, text: final.output_text, usage: final.usage };
}

// Twins: the other form of a stored answer (chat JSON -> stream, stream -> JSON, tool calls,
// Responses both ways), each converted by the proxy.
async function streamed(body) {
  const { data: stream, response } = await client.chat.completions
    .create({ ...body, stream: true, stream_options: { include_usage: true } }).withResponse();
  let text = "";
  let usage = null;
  const calls = {};
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const ch of chunk.choices) {
      text += ch.delta.content ?? "";
      for (const call of ch.delta.tool_calls ?? []) {
        const slot = (calls[call.index] ??= { name: "", arguments: "" });
        slot.name += call.function?.name ?? "";
        slot.arguments += call.function?.arguments ?? "";
      }
    }
  }
  return { status: response.headers.get("x-cache-status"), text, usage, calls: Object.values(calls) };
}
async function plain(body) {
  const { data, response } = await client.chat.completions.create(body).withResponse();
  const msg = data.choices[0].message;
  return { status: response.headers.get("x-cache-status"), text: msg.content ?? "", usage: data.usage,
           calls: (msg.tool_calls ?? []).map((t) => ({ name: t.function.name, arguments: t.function.arguments })) };
}
const twinChat = { model: "gpt-4o-mini", messages: [{ role: "user", content: "node twin" }] };
out.twin_chat = { json: await plain(twinChat), stream: await streamed(twinChat) };
const tools = [{ type: "function", function: { name: "extract_student_info", parameters: { type: "object" } } }];
const toolChat = { model: "recorded-tools", messages: [{ role: "user", content: "node tools" }], tools };
out.twin_tools = { stream: await streamed(toolChat), json: await plain(toolChat) };
{
  const { data, response } = await client.responses.create({ model: "gpt-4.1", input: "node twin r" }).withResponse();
  const stream = client.responses.stream({ model: "gpt-4.1", input: "node twin r" });
  let deltas = "";
  stream.on("response.output_text.delta", (e) => { deltas += e.delta; });
  const final = await stream.finalResponse();
  out.twin_responses = { first: response.headers.get("x-cache-status"), text: data.output_text,
                         deltas, streamed: final.output_text, usage: [data.usage, final.usage] };
  // the stream stored by the steps above, asked for as one object
  const back = await client.responses.create({ model: "gpt-4.1", input: "node responses" }).withResponse();
  out.twin_responses_back = { status: back.response.headers.get("x-cache-status"),
                              text: back.data.output_text, usage: back.data.usage };
}

const emb = await client.embeddings.create({ model: "text-embedding-3-small", input: "x", dimensions: 4 });
out.embedding = emb.data[0].embedding;

const img = await client.images.generate({ prompt: "node image", response_format: "url" });
out.image_url = img.data[0].url;

try {
  await client.chat.completions.create({ ...chat, model: "fake-error-429" });
  out.error = "none";
} catch (e) {
  out.error = { name: e.constructor.name, status: e.status, code: e.code };
}

const models = await client.models.list();
out.models = models.data.map((m) => m.id);
console.log(JSON.stringify(out));
