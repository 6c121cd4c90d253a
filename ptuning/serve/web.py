"""The chat page: Gradio's chat component on the server's FastAPI app, through the same engine as the API.

Pick the prefix (or the bare base model), chat with history (rendered by the family's template, the oldest
turns left out when the conversation outgrows the model's positions, as the chat command does), watch the
answer stream in, and clear the conversation. The page sends no system message (ChatGLM-6B's template has
none) and only settings the API accepts (``temperature`` 0 to 2, ``top_p`` above 0, ``max_tokens`` below the
model's positions). Sampling settings start at the original web demo's
(``top_p`` 0.7, ``temperature`` 0.95); ``temperature`` 0 is greedy.
"""

from __future__ import annotations

import asyncio
import os
import secrets

from ..models.base import Conversation
from .protocol import APIError, Sampling
from .scheduler import Delta, Failure
from .service import Service, failure_error

# Element ids the browser test finds the page's parts by.
IDS = {"prefix": "prefix", "chat": "chat", "message": "message", "send": "send", "clear": "clear",
       "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p"}


def _text(content) -> str:
    """A chat message's text (Gradio hands messages back as strings or as lists of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return "" if content is None else str(content)


def conversation_from(history: list[dict], query: str) -> Conversation:
    """The page's message list (``{"role", "content"}``, user and assistant alternating) plus the new query."""
    turns, user = [], None
    for message in history or []:
        role, text = message.get("role"), _text(message.get("content"))
        if role == "user":
            user = text
        elif role == "assistant" and user is not None:
            turns.append((user, text))
            user = None
    return Conversation(query=query, history=turns)


def build_page(service: Service):
    """The page as a ``gradio.Blocks``."""
    import gradio as gr

    with gr.Blocks(title="ptuning chat", analytics_enabled=False) as page:
        gr.Markdown(f"### ptuning · {service.base_name}\nOne frozen backbone, a prefix per task. "
                    "Pick the prefix, type a message, press Enter.")
        with gr.Row():
            model = gr.Dropdown(choices=service.model_names,
                                value=service.prefixes[0] if service.prefixes else service.base_name,
                                label="Prefix (model)", elem_id=IDS["prefix"], scale=2)
            max_tokens = gr.Slider(1, max(1, min(2048, service.max_length - 8)),
                                   value=min(service.default_max_tokens, service.max_length // 2), step=1,
                                   label="Max new tokens", elem_id=IDS["max_tokens"])
            temperature = gr.Slider(0.0, 2.0, value=0.95, step=0.05, label="Temperature (0 = greedy)",
                                    elem_id=IDS["temperature"])
            top_p = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Top p", elem_id=IDS["top_p"])
        # plain text: answers are shown as the model wrote them (ADGEN prompts are full of markdown's "*")
        chatbot = gr.Chatbot(elem_id=IDS["chat"], height=360, label="Conversation", render_markdown=False)
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                             elem_id=IDS["message"], autofocus=True)
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id=IDS["send"])
            clear = gr.Button("Clear", elem_id=IDS["clear"])

        async def respond(query, history, name, max_new, temp, nucleus):
            history = list(history or [])
            if not query or not query.strip():
                yield "", history
                return
            history += [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
            yield "", history
            sampling = Sampling(max_tokens=int(max_new), temperature=float(temp), top_p=float(nucleus), n=1,
                                stop=[], seed=None, stream=True, include_usage=False)
            try:
                prefix = service.resolve(name)
                # tokenizing a long conversation takes a while: off the event loop, as the API does it
                ids, budget = await asyncio.to_thread(service.prompt, conversation_from(history[:-2], query),
                                                      sampling.max_tokens, param="message", fit=True)
            except APIError as err:
                history[-1]["content"] = f"(error: {err.message})"
                yield "", history
                return
            generation = service.start([(ids, budget)], prefix, sampling)
            answer = ""
            async for event in generation.events():  # leaving early (page closed, Stop) cancels the row
                if isinstance(event, Delta):
                    answer += event.text
                    history[-1]["content"] = answer
                    yield "", history
                elif isinstance(event, Failure):
                    history[-1]["content"] = f"{answer} (error: {failure_error(event).message})"
                    yield "", history

        inputs = [message, chatbot, model, max_tokens, temperature, top_p]
        # the scheduler batches concurrent users: no per-event queue limit in front of it
        message.submit(respond, inputs, [message, chatbot], concurrency_limit=None, api_visibility="private")
        send.click(respond, inputs, [message, chatbot], concurrency_limit=None, api_visibility="private")
        clear.click(lambda: ([], ""), None, [chatbot, message], api_visibility="private")
    return page


def mount_web(app, service: Service, path: str, *, api_key: str | None = None):
    """Mounts the page at ``path``; with ``api_key`` the page asks for it as its password (any user name)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    auth = None
    if api_key is not None:

        def auth(user: str, password: str) -> bool:
            return secrets.compare_digest(password.encode(), api_key.encode())

    return gr.mount_gradio_app(app, build_page(service), path=path, auth=auth, footer_links=[],
                               show_error=True)
